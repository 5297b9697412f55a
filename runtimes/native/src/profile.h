// Latency and memory profile of a generation, in the JSON schema of the Python runtime's (runtimes/profiler.py
// Profile.summary): load times, routing, TTFT, prefill and decode tokens/s, per-token p50/p95, the split over graph
// kinds, and RSS/PSS (from /proc, Linux and Android) at each phase with the peak and what each load added.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "engine.h"

namespace mode_edge {

double now_seconds();  // a steady clock
// Resident and proportional set sizes and the resident high-water mark of this process, bytes (-1: unknown).
struct Memory {
  int64_t rss = -1, pss = -1, peak_rss = -1;
};
Memory memory_now();

struct Profile {
  // Starts the clock and resets the kernel's peak RSS of this process (Linux: /proc/self/clear_refs), so that
  // memory.peak_rss_mb is this profile's peak, not an earlier generation's.
  Profile();
  double t0 = now_seconds();
  nlohmann::json phases = nlohmann::json::array();
  std::vector<std::pair<std::string, nlohmann::json>> loads;  // in load order: seconds, RSS added, bytes on disk
  GraphTimes graph_s;
  std::vector<double> token_s;  // wall time of every token; the first includes routing and the prefill
  int64_t prompt_tokens = 0;
  double prefill_s = 0, route_s = 0;

  void mark(const std::string& phase);
  // Runs fn as the load of `name` (disk_bytes of weights), timing it and the RSS it adds.
  template <class F>
  void load(const std::string& name, int64_t disk_bytes, F fn) {
    int64_t before = memory_now().rss;
    double t = now_seconds();
    fn();
    double s = now_seconds() - t;
    loads.push_back({name, {{"s", s}, {"rss_added", memory_now().rss - before}, {"disk_bytes", disk_bytes}}});
    mark("loaded " + name);
  }
  nlohmann::json summary() const;
};

}  // namespace mode_edge
