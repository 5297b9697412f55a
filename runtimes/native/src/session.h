// A serving session natively, as runtimes/session.py: the base loaded once, experts loaded on demand and evicted
// least-recently-used within the memory budget (weight bytes on disk, the Python runtime's accounting), prompt
// routing over every installed pack that passes its checks (a damaged one is warned about once and left out).
#pragma once
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine.h"
#include "profile.h"
#include "routing.h"
#include "sampling.h"

namespace mode_edge {

struct SessionOptions {
  double budget_mb = 0;     // 0: no budget
  int threads = 0;          // 0: onnxruntime's default (one per physical core)
  bool verify = true;       // sha256 of every file before it is loaded
  std::string ort_library;  // "" : $MODE_EDGE_ORT_LIB or libonnxruntime.so
  // Public keys (.pub paths or "ed25519 BASE64" lines) the app pins: when any, every pack must carry one's signature
  // (checked at each load; one without is left out as a damaged pack is). Needs verify.
  std::vector<std::string> trusted_keys;
  // One line per warning, said once the first selection stands (default: "warning: ..." on stderr); the profile
  // JSON of that generation lists them too ("warnings").
  std::function<void(const std::string&)> warn;
};

struct GenerateOptions {
  // "auto" (route), "none" or comma-separated names; nullopt: the experts the last select made active
  std::optional<std::string> experts = std::string("auto");
  int route_top_k = 1;
  std::string router = "centroid";
  int64_t max_new_tokens = 64;
  Sampling sampling;
  std::function<void(const std::vector<float>&)> on_logits;  // each step's logits before its token is drawn
  bool chat = false;  // the prompt is a chat template's: stop at its end of turn too (UserError without a template)
  std::vector<int64_t> route_ids;  // "auto" routes on these when given (a chat prompt's user message), else the prompt
};

class Session {
 public:
  // Loads the bundle's base (timed into the next generation's profile as "base"). Throws UserError.
  Session(const std::string& bundle, SessionOptions options);

  // Make exactly `names` the active experts, loading what is missing and evicting least recently used ones the
  // budget cannot hold; returns the evicted. Throws UserError (not installed, damaged, over the budget).
  std::vector<std::string> select(const std::vector<std::string>& names);
  // The experts a prompt should run with: at most top_k, or none (the bare backbone).
  std::vector<std::string> route(const std::vector<int64_t>& prompt, int top_k, const std::string& router);
  // Generates after `prompt`, calling on_token(id) for each new token (return false to stop); stops at the
  // bundle's eos. Afterwards profile() holds this generation's profile.
  void generate(const std::vector<int64_t>& prompt, const GenerateOptions& options,
                const std::function<bool(int64_t)>& on_token);
  nlohmann::json profile() const { return last_profile_; }
  std::vector<std::string> loaded() const { return {lru_.begin(), lru_.end()}; }
  const Engine& engine() const { return *engine_; }

 private:
  int64_t expert_bytes(const std::string& name) const;
  std::vector<std::string> parse_experts(const std::string& value) const;

  SessionOptions options_;
  std::unique_ptr<Engine> engine_;
  std::optional<double> budget_;  // bytes
  std::list<std::string> lru_;  // loaded experts, least recently used first
  std::map<std::string, GateFile> gates_;
  PinnedKeys keys_;
  std::map<std::string, std::string> damaged_;  // installed experts that failed their checks: the reason
  std::vector<std::string> pending_warnings_, warnings_;  // not said yet; said since the last generation
  std::string unrouted_warning_;
  std::string ort_version_;  // of the onnxruntime library the graphs run on, for the profile  // said at the first routing by centroid or logistic
  std::map<std::string, std::string> verified_;  // per installed expert: its files' stamps when last hashed
  std::map<std::string, std::vector<std::string>> pack_files_;  // per installed expert: the files its pack lists
  std::string stamps(const Bundle& b, const std::string& name) const;
  Profile profile_;  // the next generation's (holds the base's load until the first one)
  nlohmann::json last_profile_, last_scores_, last_router_;
};

}  // namespace mode_edge
