#include "session.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <sstream>

#include "errors.h"
#include "names.h"

namespace mode_edge {
namespace {

constexpr double kMB = 1 << 20;

std::string mb(double bytes) {  // one decimal: 96.2 against a budget of 96.1 must not read "96 > 96"
  char text[32];
  std::snprintf(text, sizeof text, "%.1f", bytes / kMB);
  return text;
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace

Session::Session(const std::string& bundle, SessionOptions options) : options_(std::move(options)) {
  if (!options_.warn) options_.warn = [](const std::string& m) { std::cerr << "warning: " << m << "\n"; };
  if (!std::isfinite(options_.budget_mb) || options_.budget_mb < 0)
    throw UserError("the memory budget (MB) must be a number > 0 (0: none)");
  if (options_.threads < 0 || options_.threads > 1024) throw UserError("--threads must be an integer in 1 .. 1024");
  if (options_.budget_mb > 0) budget_ = options_.budget_mb * kMB;
  keys_ = parse_pinned_keys(options_.trusted_keys);
  if (!keys_.empty() && !options_.verify)
    throw UserError("trusted keys vouch for a pack's files through their sha256, so the files must be verified: drop "
                    "--no-verify");
  profile_.mark("start");
  Bundle b = read_bundle(bundle);
  if (budget_ && b.base_bytes > *budget_)
    throw UserError("the base alone needs " + mb(b.base_bytes) + " MB, more than the memory budget of " + mb(*budget_) +
                    " MB; export with a smaller --quant (int4) or raise the memory budget");
  OrtRuntime& ort = OrtRuntime::get(options_.ort_library, options_.threads);
  ort_version_ = ort.version();
  int64_t base_bytes = b.base_bytes;
  profile_.load("base", base_bytes, [&] { engine_ = std::make_unique<Engine>(ort, std::move(b), options_.verify); });
  const Bundle& bb = engine_->bundle();
  for (auto& name : installed(bb)) {
    try {  // each pack's files are verified here; a load hashes them again only if they changed since (stamps)
      Pack pack = read_pack(bb, name, options_.verify, keys_);
      gates_[name] = read_gate(pack.folder + "/" + pack.gate, bb.n_blocks, bb.decoder.dim, "expert '" + name + "'",
                               reinstall_fix(bb, name));
      for (auto& [rel, record] : pack.files) pack_files_[name].push_back(rel);
      verified_[name] = stamps(bb, name);
    } catch (const UserError& e) {
      damaged_[name] = e.what();
      pending_warnings_.push_back(std::string(e.what()) + "; it is left out until then");
    }
  }
  std::vector<std::string> unrouted;  // said once: which packs the centroid and logistic routers cannot judge
  for (auto& [name, g] : gates_)
    if (!g.has_router()) unrouted.push_back(name);
  if (!unrouted.empty())
    unrouted_warning_ = (unrouted.size() == 1 ? "expert " + unrouted[0] + " carries"
                                              : "experts " + joined(unrouted) + " carry") +
                        " no router (trained without --general): " +
                        (unrouted.size() == gates_.size()
                             ? "routing falls back to gate rows for every pack"
                             : std::string("the centroid and logistic routers never pick ") +
                                   (unrouted.size() == 1 ? "it" : "them"));
}

std::string Session::stamps(const Bundle& b, const std::string& name) const {
  std::string out;  // size, mtime, ctime and inode of pack.json and the pack's files: a changed one differs
  std::string folder = b.expert_folder(name);
  std::vector<std::string> files = {"pack.json"};
  auto listed = pack_files_.find(name);
  if (listed != pack_files_.end()) files.insert(files.end(), listed->second.begin(), listed->second.end());
  for (auto& rel : files) {
    struct stat st;
    if (lstat((folder + "/" + rel).c_str(), &st) != 0) continue;
    out += rel + ":" + std::to_string(st.st_size) + ":" + std::to_string(st.st_mtim.tv_sec) + "." +
           std::to_string(st.st_mtim.tv_nsec) + ":" + std::to_string(st.st_ctim.tv_sec) + "." +
           std::to_string(st.st_ctim.tv_nsec) + ":" + std::to_string(st.st_ino) + ";";
  }
  return out;
}

int64_t Session::expert_bytes(const std::string& name) const {
  if (damaged_.count(name)) throw UserError(damaged_.at(name));
  const Bundle& b = engine_->bundle();
  if (!b.experts.count(name))
    throw UserError("expert '" + name + "' is not installed in " + b.root + " (installed: " +
                    (b.experts.empty() ? "none" : joined(installed(b))) + "); install its pack (`mode-edge install`)");
  return b.experts.at(name).bytes;
}

std::vector<std::string> Session::select(const std::vector<std::string>& names) {
  int64_t need = 0;
  check_names(names, "--experts");
  for (auto& n : names) need += expert_bytes(n);
  const int64_t base = engine_->bundle().base_bytes;
  if (budget_ && base + need > *budget_)
    throw UserError("base (" + mb(base) + " MB) + experts " + joined(names) + " (" + mb(need) +
                    " MB) exceed the memory budget of " + mb(*budget_) +
                    " MB; select fewer experts (or a smaller --route-top-k)");
  int64_t used = base;
  for (auto& n : lru_) used += expert_bytes(n);
  for (auto& n : names)
    if (std::find(lru_.begin(), lru_.end(), n) == lru_.end()) used += expert_bytes(n);
  std::vector<std::string> evicted;
  for (auto it = lru_.begin(); it != lru_.end() && budget_ && used > *budget_;) {  // least recently used first
    if (std::find(names.begin(), names.end(), *it) != names.end()) { ++it; continue; }
    used -= expert_bytes(*it);
    engine_->unload_expert(*it);
    evicted.push_back(*it);
    it = lru_.erase(it);
  }
  for (auto& n : names) {
    if (!engine_->loaded(n)) {  // hashed again only if a file changed since it was verified
      bool changed = options_.verify && stamps(engine_->bundle(), n) != verified_[n];
      profile_.load("expert " + n, expert_bytes(n), [&] { engine_->load_expert(n, changed, keys_); });
      if (changed) verified_[n] = stamps(engine_->bundle(), n);
    }
    lru_.remove(n);
    lru_.push_back(n);
  }
  engine_->active = names;
  for (auto& w : pending_warnings_) {  // said once the selection stands: asking for a damaged one is the error alone
    options_.warn(w);
    warnings_.push_back(w);
  }
  pending_warnings_.clear();
  return evicted;
}

std::vector<std::string> Session::route(const std::vector<int64_t>& prompt, int top_k, const std::string& router) {
  if (prompt.empty()) throw UserError("the prompt is empty; routing needs at least one token");
  if (std::find(routers().begin(), routers().end(), router) == routers().end())
    throw UserError("--router must be one of centroid, logistic, gate, got '" + router + "'");
  if (top_k < 1) throw UserError("--route-top-k must be an integer >= 1");
  if (gates_.empty()) {  // nothing to route to: the bare backbone, and no router decided
    last_router_ = nullptr;
    last_scores_ = nullptr;
    return {};
  }
  if (router != "gate" && !unrouted_warning_.empty()) {
    options_.warn(unrouted_warning_);
    warnings_.push_back(unrouted_warning_);
    unrouted_warning_.clear();
  }
  last_router_ = effective_router(router, gates_);
  last_scores_ = nlohmann::json::object();
  const Bundle& b = engine_->bundle();
  RouteFeatures features(gates_, b.n_blocks, b.decoder.dim, static_cast<int64_t>(prompt.size()));
  engine_->block_inputs(prompt, [&](int block, const float* h, int64_t T) { features.add(block, h, T); });
  auto scores = features.scores(router);
  for (auto& [name, s] : scores) last_scores_[name] = s;
  return choose(scores, installed(b), top_k);
}

std::vector<std::string> Session::parse_experts(const std::string& value) const {
  if (value == "none") return {};
  auto names = split_names(value, "--experts");
  if (names.empty()) throw UserError("--experts is empty; give 'auto', 'none' or comma-separated expert names");
  return names;
}

void Session::generate(const std::vector<int64_t>& prompt, const GenerateOptions& o,
                       const std::function<bool(int64_t)>& on_token) {
  check_sampling(o.sampling);
  if (prompt.empty()) throw UserError("the prompt is empty; give at least one token id");
  if (o.max_new_tokens < 1) throw UserError("--max-new-tokens must be an integer >= 1");
  const Bundle& b = engine_->bundle();
  auto in_vocabulary = [&](const std::vector<int64_t>& ids, const std::string& what) {
    for (int64_t id : ids)
      if (id < 0 || id >= b.decoder.vocab_size)
        throw UserError(what + " " + std::to_string(id) + " is outside the vocabulary (0 .. " +
                        std::to_string(b.decoder.vocab_size - 1) + "); tokenize with this bundle's tokenizer.json");
  };
  in_vocabulary(prompt, "token id");
  if (o.chat && !b.chat_stop_ids)
    throw UserError("bundle " + b.root + " has no chat template (its checkpoint has none, or it was exported before "
                    "bundles recorded one): drop --chat, or export it again");
  in_vocabulary(o.route_ids, "route token id");
  std::vector<int64_t> stops;  // the bundle's eos, and with chat the template's end of turn
  if (b.eos_id) stops.push_back(*b.eos_id);
  if (o.chat) stops.insert(stops.end(), b.chat_stop_ids->begin(), b.chat_stop_ids->end());
  int64_t limit = engine_->context();
  if (int64_t(prompt.size()) + o.max_new_tokens > limit)
    throw UserError("prompt (" + std::to_string(prompt.size()) + " tokens) + --max-new-tokens " +
                    std::to_string(o.max_new_tokens) + " exceed the model's context of " + std::to_string(limit) +
                    " tokens; shorten one of them");
  bool automatic = o.experts == "auto";
  std::vector<std::string> chosen = !o.experts || automatic ? engine_->active : parse_experts(*o.experts);
  Profile& p = profile_;
  p.token_s.clear();  // what a generation that failed left behind; the loads since the last one stay
  p.graph_s.clear();
  p.prefill_s = p.route_s = 0;
  p.prompt_tokens = static_cast<int64_t>(prompt.size());
  if (automatic) {
    double t = now_seconds();
    chosen = route(o.route_ids.empty() ? prompt : o.route_ids, o.route_top_k, o.router);
    p.route_s = now_seconds() - t;
  }
  select(chosen);
  p.mark("experts selected");
  SplitMix64 rng(o.sampling.seed);
  Cache cache;
  cache.capacity_hint = static_cast<int64_t>(prompt.size()) + o.max_new_tokens;
  int64_t n_new = 0;
  double t = now_seconds();
  std::vector<float> logits = engine_->forward(prompt, cache, &p.graph_s);
  for (int64_t i = 0; i < o.max_new_tokens; i++) {
    if (o.on_logits) o.on_logits(logits);
    int64_t token = sample(logits, o.sampling, rng);
    double now = now_seconds();
    p.token_s.push_back(now - t);
    if (i == 0) {
      p.prefill_s = now - t;
      p.mark("prefill done");
    }
    n_new++;
    bool more = on_token(token);
    t = now_seconds();  // the caller's time is not the model's
    bool stop = std::find(stops.begin(), stops.end(), token) != stops.end();
    if (!more || stop || i + 1 == o.max_new_tokens) break;
    logits = engine_->forward({token}, cache, &p.graph_s);
  }
  p.mark("decode done");
  nlohmann::json summary = {{"experts", chosen},
                            {"router", automatic ? last_router_ : nlohmann::json(nullptr)},
                            {"route_scores", automatic ? last_scores_ : nlohmann::json(nullptr)},
                            {"backend", "onnx"},
                            {"runtime", "native"},
                            {"onnxruntime", ort_version_},
                            {"new_tokens", n_new},
                            {"warnings", warnings_}};
  summary.update(p.summary());
  last_profile_ = summary;
  profile_ = Profile();  // the next generation's profile starts here
  profile_.mark("start");
  warnings_.clear();
}

}  // namespace mode_edge
