// Prompt routing natively: which installed experts (or none) a prompt runs with, from each pack's gate file
// (safetensors), with the three routers of runtimes/routing.py (its docstring gives their sources and reasons):
// "centroid" (nearest centroid with a shared diagonal variance, general text a class of its own), "logistic" (each
// pack's domain-vs-general regression claims a prompt with a positive logit) and "gate" (mean gate logit; never
// "none"). Centroid and logistic fall back to gate rows when no pack carries router statistics.
#pragma once
#include <map>
#include <string>
#include <vector>

namespace mode_edge {

// The tensors of one gate file the routers read: name -> float32 values, with their shapes.
struct GateFile {
  std::map<std::string, std::vector<float>> tensors;
  std::map<std::string, std::vector<int64_t>> shapes;
  bool has_router() const;
  const std::vector<float>& at(const std::string& key) const { return tensors.at(key); }
};

// Reads a gate file (safetensors: an 8-byte little-endian header length, a JSON header, the raw tensors) and checks
// that it holds gate rows for n_blocks blocks of width d (and router tensors of that shape, where present).
// Throws UserError("expert 'NAME' is damaged: PATH ...; FIX").
GateFile read_gate(const std::string& path, int n_blocks, int64_t d, const std::string& what, const std::string& fix);

// Running sums over the prompt's block inputs, fed chunk by chunk (Engine::block_inputs), from which every router
// scores: per block the sum of RMS-normalised rows (tokens after the first, or the only one) and every gate's logits.
class RouteFeatures {
 public:
  RouteFeatures(const std::map<std::string, GateFile>& gates, int n_blocks, int64_t d, int64_t prompt_tokens);
  void add(int block, const float* h, int64_t T);  // T rows of width d, the next ones of the prompt for this block
  // name -> score of every installed candidate under `router`, plus "none" for general text (centroid, logistic).
  std::map<std::string, double> scores(const std::string& router) const;

 private:
  const std::map<std::string, GateFile>& gates_;
  int n_blocks_;
  int64_t d_, tokens_;
  std::vector<int64_t> seen_;         // rows seen per block
  std::vector<double> pooled_;        // (n_blocks, d) sums of normalised rows after the first
  std::map<std::string, double> gate_sum_;  // sum over blocks and tokens of each gate's logit
};

const std::vector<std::string>& routers();  // centroid, logistic, gate

// centroid/logistic -> gate when no gate file carries router statistics.
std::string effective_router(const std::string& router, const std::map<std::string, GateFile>& gates);

// The experts to run: at most top_k candidates by descending score (ties in name order) above "none" (the bare
// backbone: an empty answer).
std::vector<std::string> choose(const std::map<std::string, double>& scores, const std::vector<std::string>& order,
                                int top_k);

}  // namespace mode_edge
