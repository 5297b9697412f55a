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

int64_t sample(const std::vector<float>& logits, const Sampling& s, std::mt19937_64& rng) {
  auto V = static_cast<int64_t>(logits.size());
  if (s.temperature == 0) return std::max_element(logits.begin(), logits.end()) - logits.begin();
  double top = *std::max_element(logits.begin(), logits.end());
  std::vector<double> z(V);
  for (int64_t i = 0; i < V; i++) z[i] = (logits[i] - top) / s.temperature;  // the largest is 0: no overflow
  if (s.top_k > 0 && s.top_k < V) {
    std::vector<double> sorted(z);
    std::nth_element(sorted.begin(), sorted.begin() + (V - s.top_k), sorted.end());
    double kth = sorted[V - s.top_k];
    for (auto& v : z)
      if (v < kth) v = -INFINITY;
  }
  std::vector<double> p(V);
  double sum = 0;
  for (int64_t i = 0; i < V; i++) sum += p[i] = std::exp(z[i]);
  for (auto& v : p) v /= sum;
  if (s.top_p < 1) {
    std::vector<int64_t> order(V);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
    std::vector<double> kept(V, 0.0);
    double before = 0, mass = 0;
    for (int64_t i : order) {
      if (before >= s.top_p) break;  // the smallest set whose mass reaches top_p
      kept[i] = p[i];
      mass += p[i];
      before += p[i];
    }
    for (auto& v : kept) v /= mass;
    p.swap(kept);
  }
  // a uniform double in [0, 1) from the top 53 bits: the same on every platform (std::uniform_real_distribution's
  // algorithm is the standard library's own, so libstdc++ and the NDK's libc++ would draw differently)
  double u = static_cast<double>(rng() >> 11) * 0x1p-53, acc = 0;
  for (int64_t i = 0; i < V; i++)
    if (p[i] > 0 && (acc += p[i]) > u) return i;
  for (int64_t i = V - 1; i >= 0; i--)  // rounding left u past the total: the last token with mass
    if (p[i] > 0) return i;
  return 0;
}

}  // namespace mode_edge
