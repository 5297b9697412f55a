#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "errors.h"

namespace mode_edge {

void check_sampling(const Sampling& s) {
  if (!(std::isfinite(s.temperature) && s.temperature >= 0))
    throw UserError("--temperature must be a finite number >= 0 (0: greedy)");
  if (s.top_k < 0) throw UserError("--top-k must be an integer >= 0 (0: off)");
  if (!(s.top_p > 0 && s.top_p <= 1)) throw UserError("--top-p must be in (0, 1] (1: off)");
}

double SplitMix64::uniform() {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<double>((z ^ (z >> 31)) >> 11) * 0x1p-53;
}

int64_t sample(const std::vector<float>& logits, const Sampling& s, SplitMix64& rng) {
  auto V = static_cast<int64_t>(logits.size());
  if (s.temperature == 0) return std::max_element(logits.begin(), logits.end()) - logits.begin();
  double top = *std::max_element(logits.begin(), logits.end());
  std::vector<double> z(V);
  for (int64_t i = 0; i < V; i++) z[i] = (static_cast<double>(logits[i]) - top) / s.temperature;  // largest 0
  if (s.top_k > 0 && s.top_k < V) {
    std::vector<double> sorted(z);
    std::nth_element(sorted.begin(), sorted.begin() + (V - s.top_k), sorted.end());
    double kth = sorted[V - s.top_k];
    for (auto& v : z)
      if (v < kth) v = -INFINITY;
  }
  std::vector<double> w(V);
  double sum = 0;
  for (int64_t i = 0; i < V; i++) sum += w[i] = std::exp(z[i]);
  if (s.top_p < 1) {
    std::vector<int64_t> order(V);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return w[a] > w[b]; });
    std::vector<double> kept(V, 0.0);
    double before = 0;  // the mass of the likelier tokens
    for (int64_t i : order) {
      if (before >= s.top_p) break;  // the smallest set whose mass reaches top_p
      kept[i] = w[i];
      before += w[i] / sum;
    }
    w.swap(kept);
  }
  std::vector<double> cdf(V);
  double acc = 0;
  for (int64_t i = 0; i < V; i++) cdf[i] = acc += w[i];
  double target = rng.uniform() * acc;
  auto first = std::upper_bound(cdf.begin(), cdf.end(), target);  // the first running sum above the draw
  if (first != cdf.end()) return first - cdf.begin();
  for (int64_t i = V - 1; i >= 0; i--)  // rounding past the total: the last token kept
    if (w[i] > 0) return i;
  return 0;
}

}  // namespace mode_edge
