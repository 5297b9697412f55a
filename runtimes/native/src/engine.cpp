#include "engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "errors.h"

namespace mode_edge {
namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Adds the wall time of fn to times[kind] (when timing).
template <class F>
void timed(GraphTimes* times, const char* kind, F fn) {
  double t = times ? now_s() : 0;
  fn();
  if (times) (*times)[kind] += now_s() - t;
}

// The graph interface of docs/bundle-format.md: a component's input and output names, in order.
using Names = std::pair<std::vector<std::string>, std::vector<std::string>>;

Names block_names(int layers, bool expert, bool local_tables) {
  Names n{{"hidden", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"}, {"hidden_out"}};
  if (local_tables) n.first.insert(n.first.end(), {"local_cos_cache", "local_sin_cache"});  // Gemma 3's sliding layers
  if (expert) n.second.push_back("gate_logit");
  for (int j = 0; j < layers; j++)
    for (const char* kv : {"key", "value"}) {
      n.first.push_back("past_" + std::string(kv) + std::to_string(j));
      n.second.push_back("present_" + std::string(kv) + std::to_string(j));
    }
  return n;
}

// The graph of `c` at `path`, after checking that its manifest entry names the interface `want`.
std::unique_ptr<Graph> load_graph(OrtRuntime& ort, const std::string& path, const Component& c, const Names& want,
                                  const std::string& fix) {
  if (c.inputs != want.first || c.outputs != want.second)
    throw UserError(path + ": its manifest entry does not name the graph interface of this version (inputs " +
                    want.first[0] + ", ...); " + fix);
  return std::make_unique<Graph>(ort, path, c, fix);
}

}  // namespace

namespace {

// theta^(-2i/rotary_dim), i < rotary_dim/2: plain RoPE's frequencies.
std::vector<double> plain_frequencies(const Decoder& d, double theta) {
  std::vector<double> inv_freq(d.rotary_dim / 2);
  for (size_t i = 0; i < inv_freq.size(); i++) inv_freq[i] = std::pow(theta, -static_cast<double>(2 * i) / d.rotary_dim);
  return inv_freq;
}

// cos and sin of p * inv_freq[i] times `scale`, positions 0 .. length-1, appended to `tables`.
void append_pair(const std::vector<double>& inv_freq, double scale, int64_t length,
                 std::vector<std::vector<float>>& tables) {
  size_t half = inv_freq.size();
  std::vector<float> cos(length * half), sin(length * half);
  for (int64_t p = 0; p < length; p++)
    for (size_t i = 0; i < half; i++) {
      double f = static_cast<double>(p) * inv_freq[i];
      cos[p * half + i] = static_cast<float>(std::cos(f) * scale);
      sin[p * half + i] = static_cast<float>(std::sin(f) * scale);
    }
  tables.push_back(std::move(cos));
  tables.push_back(std::move(sin));
}

}  // namespace

std::vector<std::vector<float>> rotary_tables(const Decoder& d, int64_t length) {
  std::vector<double> inv_freq = plain_frequencies(d, d.rope_theta);
  for (size_t i = 0; i < inv_freq.size(); i++) {
    double& freq = inv_freq[i];
    if (d.rope_llama3) {  // mode_edge/rope.py, operation for operation
      auto [factor, low, high, old] = *d.rope_llama3;
      double wavelen = 2 * M_PI / freq, smooth = (old / wavelen - low) / (high - low);
      if (wavelen >= old / high && wavelen <= old / low) freq = (1 - smooth) * freq / factor + smooth * freq;
      else if (wavelen > old / low) freq = freq / factor;
    }
    if (!d.rope_factors.empty()) freq = freq / d.rope_factors[i];  // LongRoPE, a GGUF's divisors
  }
  std::vector<std::vector<float>> tables;
  append_pair(inv_freq, d.rope_scale, length, tables);
  if (d.rope_local_theta > 0) append_pair(plain_frequencies(d, d.rope_local_theta), 1.0, length, tables);
  return tables;
}

void mix(const std::vector<const std::vector<float>*>& ys, const std::vector<const std::vector<float>*>& logits,
         int64_t T, int64_t d, std::vector<float>& out) {
  size_t n = ys.size();
  out.resize(T * d);
  std::vector<float> a(n);
  for (int64_t t = 0; t < T; t++) {
    float top = 0;  // the backbone's logit is pinned at 0
    for (size_t j = 1; j < n; j++) top = std::max(top, (*logits[j - 1])[t]);
    float sum = 0;
    for (size_t j = 0; j < n; j++) sum += a[j] = std::exp((j ? (*logits[j - 1])[t] : 0.0f) - top);
    for (size_t j = 0; j < n; j++) a[j] /= sum;
    float* o = out.data() + t * d;
    const float* y0 = ys[0]->data() + t * d;
    for (int64_t k = 0; k < d; k++) o[k] = a[0] * y0[k];
    for (size_t j = 1; j < n; j++) {
      const float* y = ys[j]->data() + t * d;
      for (int64_t k = 0; k < d; k++) o[k] += a[j] * y[k];
    }
  }
}

Engine::Engine(OrtRuntime& ort, Bundle bundle, bool verify) : ort_(ort), bundle_(std::move(bundle)) {
  int major = 0, minor = 0;
  std::sscanf(ort_.version().c_str(), "%d.%d", &major, &minor);
  if (bundle_.decoder.sliding && major == 1 && minor < kSlidingWindowOrtMinor)  // (mode_edge/runtimes/backends.py)
    throw UserError("bundle " + bundle_.root + " has sliding-window layers, whose window onnxruntime " +
                    ort_.version() + " counts one key wider (fixed in 1.24); use onnxruntime >= 1.24");
  if (verify) verify_files(bundle_.root, bundle_.files, "bundle " + bundle_.root, kReexport);
  auto load = [&](const std::string& name, const Names& want) {
    const Component& c = bundle_.components.at(name);
    return load_graph(ort_, bundle_.root + "/" + c.onnx, c, want, kReexport);
  };
  embed_ = load("base/embed", {{"input_ids"}, {"hidden"}});
  for (int i = 0; i < bundle_.n_blocks; i++) {
    int layers = bundle_.components.at("base/block" + std::to_string(i)).layers;
    blocks_.push_back(load("base/block" + std::to_string(i), block_names(layers, false, local_tables())));
    block_layers_.push_back(layers);
    block_keys_.push_back("block" + std::to_string(i));
  }
  head_ = load("base/head", {{"hidden"}, {"logits"}});
}

void Engine::load_expert(const std::string& name, bool verify, const PinnedKeys& keys) {
  if (loaded(name)) return;
  Pack pack = read_pack(bundle_, name, verify, keys);
  Expert e;
  for (auto& c : pack.blocks) {
    e.blocks.push_back(load_graph(ort_, pack.folder + "/" + c.onnx, c, block_names(c.layers, true, local_tables()),
                                  reinstall_fix(bundle_, name)));
    e.layers.push_back(c.layers);
    e.keys.push_back(name + "/block" + std::to_string(e.keys.size()));
  }
  experts_[name] = std::move(e);
}

void Engine::unload_expert(const std::string& name) {
  experts_.erase(name);
  active.erase(std::remove(active.begin(), active.end(), name), active.end());
}

void Engine::reserve(Cache& cache, int64_t total) {
  if (total > context())
    throw UserError(std::to_string(total) + " tokens exceed the context of these graphs (" +
                    std::to_string(context()) + "); shorten the prompt or --max-new-tokens");
  if (total <= cache.capacity) return;
  int64_t want = cache.capacity == 0 ? std::max(total, cache.capacity_hint) : std::max(total, kCacheGrowth * cache.capacity);
  int64_t old = cache.capacity, hkv = bundle_.decoder.n_kv_heads, hd = bundle_.decoder.head_dim;
  cache.capacity = std::min(want, context());
  for (auto& [key, buffers] : cache.kv)
    for (auto& b : buffers) {  // keep the filled positions of every head
      KvBuffer grown(hkv * cache.capacity * hd);
      for (int64_t h = 0; h < hkv; h++)
        std::copy_n(b.data() + h * old * hd, cache.pos * hd, grown.data() + h * cache.capacity * hd);
      b = std::move(grown);
    }
  cache.tables = rotary_tables(bundle_.decoder, cache.capacity);
}

void Engine::run_block(Graph& graph, const std::string& key, int layers, const std::vector<float>& h, int64_t T,
                       Cache& cache, std::vector<float>& y, std::vector<float>* g) {
  const auto& info = ort_.cpu();
  int64_t d = bundle_.decoder.dim, hkv = bundle_.decoder.n_kv_heads, hd = bundle_.decoder.head_dim;
  auto& kv = cache.kv[key];
  if (kv.empty())
    for (int j = 0; j < 2 * layers; j++) kv.emplace_back(hkv * cache.capacity * hd);
  int32_t seqlens = static_cast<int32_t>(cache.pos + T - 1), total = static_cast<int32_t>(cache.pos + T);
  int64_t h_shape[] = {1, T, d}, one[] = {1}, kv_shape[] = {1, hkv, cache.capacity, hd};
  int64_t table[] = {cache.capacity, bundle_.decoder.rotary_dim / 2};
  int64_t g_shape[] = {1, T};
  std::vector<Ort::Value> in, out;
  in.push_back(Ort::Value::CreateTensor<float>(info, const_cast<float*>(h.data()), h.size(), h_shape, 3));
  in.push_back(Ort::Value::CreateTensor<int32_t>(info, &seqlens, 1, one, 1));
  in.push_back(Ort::Value::CreateTensor<int32_t>(info, &total, 1, nullptr, 0));
  for (auto& t : cache.tables) in.push_back(Ort::Value::CreateTensor<float>(info, t.data(), t.size(), table, 2));
  y.resize(T * d);
  out.push_back(Ort::Value::CreateTensor<float>(info, y.data(), y.size(), h_shape, 3));
  if (g) {
    g->resize(T);
    out.push_back(Ort::Value::CreateTensor<float>(info, g->data(), g->size(), g_shape, 2));
  }
  for (auto& b : kv) {  // each present_* bound to its past_*'s memory: GroupQueryAttention writes in place
    in.push_back(Ort::Value::CreateTensor<float>(info, b.data(), b.size(), kv_shape, 4));
    out.push_back(Ort::Value::CreateTensor<float>(info, b.data(), b.size(), kv_shape, 4));
  }
  graph.run(in.data(), in.size(), out.data(), out.size());
}

void Engine::forward_chunk(const int64_t* ids, int64_t T, Cache& cache, GraphTimes* times, std::vector<float>* logits,
                           const std::function<void(int, const float*, int64_t)>* visit) {
  const auto& info = ort_.cpu();
  int64_t d = bundle_.decoder.dim;
  reserve(cache, cache.pos + T);
  std::vector<float> h(T * d), y_bb, mixed;
  int64_t id_shape[] = {1, T}, h_shape[] = {1, T, d};
  timed(times, "embed", [&] {
    Ort::Value in = Ort::Value::CreateTensor<int64_t>(info, const_cast<int64_t*>(ids), T, id_shape, 2);
    Ort::Value out = Ort::Value::CreateTensor<float>(info, h.data(), h.size(), h_shape, 3);
    embed_->run(&in, 1, &out, 1);
  });
  std::vector<Expert*> active_experts;
  if (!visit)
    for (auto& name : active) active_experts.push_back(&experts_.at(name));
  std::vector<std::vector<float>> ys(active_experts.size()), gs(active_experts.size());
  for (int i = 0; i < bundle_.n_blocks; i++) {
    if (visit) (*visit)(i, h.data(), T);
    timed(times, "backbone", [&] {
      run_block(*blocks_[i], block_keys_[i], block_layers_[i], h, T, cache, y_bb, nullptr);
    });
    if (active_experts.empty()) {
      h.swap(y_bb);
      continue;
    }
    std::vector<const std::vector<float>*> outs = {&y_bb}, gates;
    for (size_t j = 0; j < active_experts.size(); j++) {
      Expert& e = *active_experts[j];
      timed(times, "experts", [&] {
        run_block(*e.blocks[i], e.keys[i], e.layers[i], h, T, cache, ys[j], &gs[j]);
      });
      outs.push_back(&ys[j]);
      gates.push_back(&gs[j]);
    }
    timed(times, "gate+mix", [&] { mix(outs, gates, T, d, mixed); });
    h.swap(mixed);
  }
  cache.pos += T;
  if (!logits) return;
  int64_t V = bundle_.decoder.vocab_size, last[] = {1, 1, d}, l_shape[] = {1, 1, V};
  logits->resize(V);
  timed(times, "head", [&] {
    Ort::Value in = Ort::Value::CreateTensor<float>(info, h.data() + (T - 1) * d, d, last, 3);
    Ort::Value out = Ort::Value::CreateTensor<float>(info, logits->data(), V, l_shape, 3);
    head_->run(&in, 1, &out, 1);
  });
}

std::vector<float> Engine::forward(const std::vector<int64_t>& ids, Cache& cache, GraphTimes* times) {
  if (ids.empty()) throw UserError("the prompt is empty; give at least one token");
  for (auto& name : active)
    if (!loaded(name)) throw std::logic_error("expert " + name + " is active but not loaded");
  std::vector<float> logits;
  for (size_t start = 0; start < ids.size(); start += kPrefillChunk) {
    int64_t T = std::min<int64_t>(kPrefillChunk, ids.size() - start);
    bool last = start + T == ids.size();  // only the last chunk's logits are wanted
    forward_chunk(ids.data() + start, T, cache, times, last ? &logits : nullptr, nullptr);
  }
  return logits;
}

void Engine::block_inputs(const std::vector<int64_t>& ids,
                          const std::function<void(int, const float*, int64_t)>& visit) {
  Cache cache;
  cache.capacity_hint = static_cast<int64_t>(ids.size());
  for (size_t start = 0; start < ids.size(); start += kPrefillChunk) {
    int64_t T = std::min<int64_t>(kPrefillChunk, ids.size() - start);
    forward_chunk(ids.data() + start, T, cache, nullptr, nullptr, &visit);
  }
}

}  // namespace mode_edge
