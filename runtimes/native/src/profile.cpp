#include "profile.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <sstream>

namespace mode_edge {
namespace {

constexpr double kMB = 1 << 20;

// The values in kB of fields `keys` ("VmRSS:") in a /proc file, in bytes, in the order given; -1 where absent.
std::vector<int64_t> proc_kb(const char* file, const std::vector<std::string>& keys) {
  std::vector<int64_t> out(keys.size(), -1);
  std::ifstream f(file);
  for (std::string line; std::getline(f, line);)
    for (size_t i = 0; i < keys.size(); i++)
      if (line.rfind(keys[i], 0) == 0) out[i] = std::stoll(line.substr(keys[i].size())) * 1024;
  return out;
}

double round_to(double v, int digits) {
  double scale = std::pow(10.0, digits);
  return std::round(v * scale) / scale;
}

nlohmann::json mb(int64_t bytes) {
  return bytes < 0 ? nlohmann::json(nullptr) : nlohmann::json(round_to(bytes / kMB, 2));
}

// numpy.percentile's default (linear interpolation between the closest ranks).
double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  double rank = q / 100.0 * (v.size() - 1);
  size_t lo = static_cast<size_t>(std::floor(rank)), hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (rank - lo);
}

}  // namespace

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

Memory memory_now() {
  auto status = proc_kb("/proc/self/status", {"VmRSS:", "VmHWM:"});
  return {status[0], proc_kb("/proc/self/smaps_rollup", {"Pss:"})[0], status[1]};
}

Profile::Profile() {
  std::ofstream("/proc/self/clear_refs") << "5";  // 5: reset the peak RSS (VmHWM); where absent, nothing happens
}

void Profile::mark(const std::string& phase) {
  Memory m = memory_now();
  phases.push_back({{"phase", phase}, {"t", now_seconds() - t0}, {"rss", m.rss},
                    {"pss", m.pss < 0 ? nlohmann::json(nullptr) : nlohmann::json(m.pss)}, {"rss_mb", mb(m.rss)},
                    {"pss_mb", mb(m.pss)}});
}

nlohmann::json Profile::summary() const {
  using nlohmann::json;
  std::vector<double> decode(token_s.size() > 1 ? token_s.begin() + 1 : token_s.end(), token_s.end());
  double decode_s = 0;
  for (double s : decode) decode_s += s;
  json load_s = json::object(), added = json::object(), graphs = json::object();
  for (auto& [name, l] : loads) {
    load_s[name] = round_to(l["s"].get<double>(), 4);
    int64_t rss = l["rss_added"], disk = l["disk_bytes"];
    added[name] = {{"rss_added_mb", mb(rss)}, {"disk_mb", mb(disk)},
                   {"ratio", disk ? json(round_to(double(rss) / disk, 3)) : json(nullptr)}};
  }
  for (auto& [kind, s] : graph_s) graphs[kind] = round_to(s, 4);
  auto or_null = [](bool ok, double v) { return ok ? json(v) : json(nullptr); };
  bool has_decode = !decode.empty();
  return {
      {"load_s", load_s},
      {"route_s", round_to(route_s, 4)},
      {"time_to_first_token_s", or_null(!token_s.empty(), token_s.empty() ? 0 : round_to(token_s[0], 4))},
      {"prompt_tokens", prompt_tokens},
      {"prefill_tokens_per_s", or_null(prefill_s > 0, prefill_s > 0 ? round_to(prompt_tokens / prefill_s, 1) : 0)},
      {"decode_tokens", decode.size()},
      {"decode_tokens_per_s", or_null(has_decode, has_decode ? round_to(decode.size() / decode_s, 2) : 0)},
      {"decode_token_ms_p50", or_null(has_decode, has_decode ? round_to(1000 * percentile(decode, 50), 2) : 0)},
      {"decode_token_ms_p95", or_null(has_decode, has_decode ? round_to(1000 * percentile(decode, 95), 2) : 0)},
      {"graph_s", graphs},
      {"memory", {{"phases", phases}, {"peak_rss_mb", mb(memory_now().peak_rss)}, {"added_by", added}}},
  };
}

}  // namespace mode_edge
