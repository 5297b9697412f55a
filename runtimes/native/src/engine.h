// The split model on the device, natively: base graphs, the loaded experts' graphs, the gate's mix, the KV cache.
// Token ids in, logits out; the same computation as runtimes/engine.py (docs/bundle-format.md "Graph interfaces"):
//   h = embed(ids)
//   for each block i:  y_bb = block_i(h);  y_j, g_j = expert_j,i(h) for every active expert j
//                      a = softmax([0, g_1 .. g_N]);  h = a_0 * y_bb + sum_j a_j * y_j
//   logits = head(h[last])
#pragma once
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bundle.h"
#include "ort.h"

namespace mode_edge {

// Most tokens one graph call takes: a longer prompt goes through in chunks, which bounds the activations the arena
// keeps (runtimes/engine.PREFILL_CHUNK, where it was measured).
constexpr int64_t kPrefillChunk = 256;
// When a cache runs out of positions its buffers grow to this many times as many (at most the context).
constexpr int64_t kCacheGrowth = 2;

// One KV buffer: `size` floats from calloc, so that the pages of positions not yet written are not resident (a
// generation sized for --max-new-tokens 2000 that zero-filled its buffers held 97 MB more after its prefill).
class KvBuffer {
 public:
  explicit KvBuffer(size_t size) : data_(static_cast<float*>(std::calloc(size, sizeof(float))), std::free), size_(size) {
    if (!data_ && size) throw std::bad_alloc();
  }
  float* data() { return data_.get(); }
  size_t size() const { return size_; }

 private:
  std::unique_ptr<float, decltype(&std::free)> data_;
  size_t size_;
};

// Keys and values of every graph's attention layers, by component ("block{i}", "NAME/block{i}"), for the first `pos`
// tokens, in buffers of `capacity` positions that GroupQueryAttention writes in place: (1, Hkv, capacity, hd) floats
// each, k before v per layer. tables: the rotary tables (capacity, r/2), r = rotary_dim, of positions 0 .. capacity-1
// (`rotary_tables`).
struct Cache {
  int64_t pos = 0, capacity = 0, capacity_hint = 0;
  std::map<std::string, std::vector<KvBuffer>> kv;
  std::vector<std::vector<float>> tables;
};

// The first onnxruntime 1.x whose GroupQueryAttention local_window_size counts the query itself, as the exported
// sliding layers need (onnxruntime PR #25927; earlier releases attend to one key more).
constexpr int kSlidingWindowOrtMinor = 24;

// Seconds spent per graph kind ("embed", "backbone", "experts", "gate+mix", "head"), as the Python profile splits them.
using GraphTimes = std::map<std::string, double>;

class Engine {
 public:
  // The bundle's base graphs, loaded once (after its files' sha256 when `verify`). Throws UserError.
  Engine(OrtRuntime& ort, Bundle bundle, bool verify);
  const Bundle& bundle() const { return bundle_; }
  int64_t context() const { return bundle_.decoder.max_seq_len; }
  // Whether the block graphs take the sliding layers' rotary tables too (Gemma 3).
  bool local_tables() const { return bundle_.decoder.rope_local_theta > 0; }

  // Load installed expert NAME's graphs (checked, signed by one of `keys` when any, and, with `verify`, its files'
  // sha256); a loaded one stays.
  void load_expert(const std::string& name, bool verify, const PinnedKeys& keys = {});
  void unload_expert(const std::string& name);
  bool loaded(const std::string& name) const { return experts_.count(name) > 0; }
  // The experts a forward mixes, in order (each loaded).
  std::vector<std::string> active;

  // ids (T >= 1) after cache.pos earlier tokens -> the logits of the last one (V floats); grows the cache. Inputs
  // longer than kPrefillChunk go through in chunks. Throws UserError beyond the context.
  std::vector<float> forward(const std::vector<int64_t>& ids, Cache& cache, GraphTimes* times = nullptr);

  // The backbone-only pass over ids that prompt routing scores: visit(block, h, T) with each block's input h
  // (T, d floats, row-major), chunk by chunk (T <= kPrefillChunk per call), in order. No cache is kept.
  void block_inputs(const std::vector<int64_t>& ids, const std::function<void(int, const float*, int64_t)>& visit);

 private:
  struct Expert {
    std::vector<std::unique_ptr<Graph>> blocks;
    std::vector<int> layers;
    std::vector<std::string> keys;  // its cache's component keys, NAME/block{i} (made once, not per token)
  };
  void forward_chunk(const int64_t* ids, int64_t T, Cache& cache, GraphTimes* times, std::vector<float>* logits,
                     const std::function<void(int, const float*, int64_t)>* visit);
  void reserve(Cache& cache, int64_t total);
  // Runs one block graph (backbone or expert) on h (T, d): y (T, d) and, for an expert, its gate logits g (T).
  void run_block(Graph& graph, const std::string& key, int layers, const std::vector<float>& h, int64_t T,
                 Cache& cache, std::vector<float>& y, std::vector<float>* g);

  OrtRuntime& ort_;
  Bundle bundle_;
  std::unique_ptr<Graph> embed_, head_;
  std::vector<std::unique_ptr<Graph>> blocks_;
  std::vector<int> block_layers_;
  std::vector<std::string> block_keys_;  // block{i}: the backbone blocks' cache keys
  std::map<std::string, Expert> experts_;
};

// The rotary tables the block graphs take, in input order, for positions 0 .. length-1: cos and sin of
// p * inv_freq[i] with inv_freq = theta^(-2i/rotary_dim), scaled as Llama 3, LongRoPE or a GGUF's divisors do where
// the decoder says so (LongRoPE also multiplies cos and sin by its attention factor), then, where the decoder has
// rope_local_theta (Gemma 3), the sliding layers' cos and sin of plain RoPE of that base (mode_edge/rope.
// rotary_pairs); (length, rotary_dim/2) floats each, computed in double and rounded once, as
// runtimes/kv_cache.rotary_tables does (the same tables: the same logits).
std::vector<std::vector<float>> rotary_tables(const Decoder& decoder, int64_t length);

// The gate's mix over T tokens of width d: per token a = softmax([0, g_1 .. g_N]) and out = a_0 y_0 + sum_j a_j y_j.
// ys[0] is the backbone's output; logits[j-1] the gate logits (T) of ys[j]. Writes out (T, d).
void mix(const std::vector<const std::vector<float>*>& ys, const std::vector<const std::vector<float>*>& logits,
         int64_t T, int64_t d, std::vector<float>& out);

}  // namespace mode_edge
