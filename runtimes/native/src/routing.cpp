#include "routing.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "errors.h"

namespace mode_edge {
namespace {

const char* kRouterKeys[] = {"router_mean", "router_var", "general_mean", "general_var", "router_weight", "router_bias"};

}  // namespace

const std::vector<std::string>& routers() {
  static const std::vector<std::string> names = {"centroid", "logistic", "gate"};
  return names;
}

bool GateFile::has_router() const {
  for (auto key : kRouterKeys)
    if (!tensors.count(key)) return false;
  return true;
}

GateFile read_gate(const std::string& path, int n_blocks, int64_t d, const std::string& what, const std::string& fix) {
  auto damaged = [&](const std::string& problem) { return UserError(what + " is damaged: " + path + " " + problem + "; " + fix); };
  std::ifstream f(path, std::ios::binary);
  if (!f) throw damaged("is missing");
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  uint64_t header_len = 0;
  if (bytes.size() < 8) throw damaged("is not a safetensors file");
  std::memcpy(&header_len, bytes.data(), 8);  // little-endian, as every platform we target
  if (header_len > bytes.size() - 8) throw damaged("is not a safetensors file");
  GateFile gate;
  try {
    auto header = nlohmann::json::parse(bytes.substr(8, header_len));
    size_t data = 8 + header_len;
    for (auto& [name, info] : header.items()) {
      if (name == "__metadata__" || info.at("dtype") != "F32") continue;  // (router_count: I64, not read)
      auto offsets = info.at("data_offsets").get<std::vector<uint64_t>>();
      auto shape = info.at("shape").get<std::vector<int64_t>>();
      int64_t count = 1;
      for (auto s : shape) {
        if (s < 0 || s > (int64_t(1) << 31)) throw damaged("has a tensor of an impossible shape");
        count *= s;
        if (count > (int64_t(1) << 31)) throw damaged("has a tensor of an impossible shape");
      }
      if (offsets.size() != 2 || offsets[0] > offsets[1] || offsets[1] > bytes.size() - data ||
          offsets[1] - offsets[0] != uint64_t(count) * 4)
        throw damaged("has a tensor outside the file");
      std::vector<float> values(count);
      std::memcpy(values.data(), bytes.data() + data + offsets[0], count * 4);
      gate.tensors[name] = std::move(values);
      gate.shapes[name] = shape;
    }
  } catch (const nlohmann::json::exception&) {
    throw damaged("is not a safetensors file");
  }
  auto rows = [&](const std::string& key) {
    auto s = gate.shapes.find(key);
    return s != gate.shapes.end() && s->second.size() == 2 && s->second[0] >= n_blocks && s->second[1] == d;
  };
  if (!rows("weight") || !gate.tensors.count("bias") || gate.at("bias").size() < size_t(n_blocks) ||
      !gate.tensors.count("eps") || gate.at("eps").empty())
    throw damaged("lacks its gate rows");
  if (gate.has_router()) {
    for (auto key : kRouterKeys)
      if (std::string(key) != "router_bias" && gate.shapes[key] != gate.shapes["weight"])
        throw damaged("holds router tensors of the wrong shape");
    if (gate.at("router_bias").empty()) throw damaged("holds router tensors of the wrong shape");
  }
  return gate;
}

RouteFeatures::RouteFeatures(const std::map<std::string, GateFile>& gates, int n_blocks, int64_t d,
                             int64_t prompt_tokens)
    : gates_(gates), n_blocks_(n_blocks), d_(d), tokens_(prompt_tokens), seen_(n_blocks, 0),
      pooled_(n_blocks * d, 0.0) {
  for (auto& [name, g] : gates) gate_sum_[name] = 0;
}

void RouteFeatures::add(int block, const float* h, int64_t T) {
  double eps = gates_.empty() ? 1e-5 : gates_.begin()->second.at("eps")[0];
  for (int64_t t = 0; t < T; t++, seen_[block]++) {
    const float* row = h + t * d_;
    double ms = 0;
    for (int64_t k = 0; k < d_; k++) ms += double(row[k]) * row[k];
    ms /= d_;
    if (seen_[block] > 0 || tokens_ == 1) {  // the first position is left out of the pooled mean (routing.py says why)
      double inv = 1.0 / std::sqrt(ms + eps);
      for (int64_t k = 0; k < d_; k++) pooled_[block * d_ + k] += row[k] * inv;
    }
    for (auto& [name, g] : gates_) {  // each gate normalises with its own eps, as the gate layer does
      double inv = 1.0 / std::sqrt(ms + g.at("eps")[0]);
      const float* w = g.at("weight").data() + block * d_;
      double logit = g.at("bias")[block];
      for (int64_t k = 0; k < d_; k++) logit += row[k] * inv * w[k];
      gate_sum_[name] += logit;
    }
  }
}

std::string effective_router(const std::string& router, const std::map<std::string, GateFile>& gates) {
  if (router == "gate") return router;
  for (auto& [name, g] : gates)
    if (g.has_router()) return router;
  return "gate";
}

std::map<std::string, double> RouteFeatures::scores(const std::string& router) const {
  std::map<std::string, double> out;
  std::string used = effective_router(router, gates_);
  if (used == "gate") {
    for (auto& [name, sum] : gate_sum_) out[name] = sum / double(n_blocks_ * tokens_);
    return out;
  }
  size_t n = n_blocks_ * d_;
  double rows = double(tokens_ > 1 ? tokens_ - 1 : 1);
  std::vector<double> f(n);
  for (size_t i = 0; i < n; i++) f[i] = pooled_[i] / rows;
  std::vector<const GateFile*> routed;
  for (auto& [name, g] : gates_)
    if (g.has_router()) routed.push_back(&g);
  if (used == "logistic") {
    for (auto& [name, g] : gates_) {
      if (!g.has_router()) continue;
      double s = g.at("router_bias")[0];
      for (size_t i = 0; i < n; i++) s += f[i] * g.at("router_weight")[i];
      out[name] = s;
    }
    out["none"] = 0;
    return out;
  }
  // centroid: the variance shared by every class is the mean of each pack's domain variance and the general one
  std::vector<double> general_mean(n, 0), general_var(n, 0), var(n, 0);
  for (auto* g : routed)
    for (size_t i = 0; i < n; i++) {
      general_mean[i] += double(g->at("general_mean")[i]) / routed.size();
      general_var[i] += double(g->at("general_var")[i]) / routed.size();
    }
  for (size_t i = 0; i < n; i++) {
    for (auto* g : routed) var[i] += g->at("router_var")[i];
    var[i] = (var[i] + general_var[i]) / (routed.size() + 1) + 1e-6;
  }
  auto score = [&](const float* mean_f, const double* mean_d) {
    double s = 0;
    for (size_t i = 0; i < n; i++) {
      double diff = f[i] - (mean_f ? mean_f[i] : mean_d[i]);
      s += diff * diff / var[i];
    }
    return -0.5 * s;
  };
  for (auto& [name, g] : gates_)
    if (g.has_router()) out[name] = score(g.at("router_mean").data(), nullptr);
  out["none"] = score(nullptr, general_mean.data());
  return out;
}

std::vector<std::string> choose(const std::map<std::string, double>& scores, const std::vector<std::string>& order,
                                int top_k) {
  std::vector<std::string> names;
  for (auto& n : order)
    if (scores.count(n)) names.push_back(n);
  if (scores.count("none")) names.push_back("none");
  auto score = [&](const std::string& n) {  // a NaN (from a gate file of NaNs) ranks last, not undefined
    double v = scores.at(n);
    return std::isnan(v) ? -INFINITY : v;
  };
  std::stable_sort(names.begin(), names.end(), [&](auto& a, auto& b) { return score(a) > score(b); });
  std::vector<std::string> out;
  for (auto& n : names) {
    if (n == "none" || int(out.size()) >= top_k) break;
    out.push_back(n);
  }
  return out;
}

}  // namespace mode_edge
