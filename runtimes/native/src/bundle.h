// Reading a bundle (manifest.json) and its installed packs (experts/NAME@ID/pack.json) for the native runtime:
// the same files, checks and messages as the Python runtime (mode_edge/bundle.py; docs/bundle-format.md).
// Only ONNX graphs with the "buffer" KV cache (bundle format version 2) run here.
#pragma once
#include <array>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "signature.h"

namespace mode_edge {

struct FileRecord {
  int64_t bytes = 0;
  std::string sha256;
};
using FileRecords = std::map<std::string, FileRecord>;  // path relative to its folder -> record

// One graph: its attention layers (0 for embed and head), input and output names in order, file relative to its folder.
struct Component {
  int layers = 0;
  std::vector<std::string> inputs, outputs;
  std::string onnx;
  // The file is the graph as onnxruntime's optimizer left it at export (onnx_optimized: "extended",
  // mode_edge/bundle.ONNX_OPTIMIZED_AHEAD): its session is created with optimization off.
  bool optimized_ahead = false;
};

struct Decoder {
  int64_t vocab_size = 0, dim = 0, n_kv_heads = 0, head_dim = 0, max_seq_len = 0;
  double rope_theta = 0;
  // Rotary scaling (mode_edge/rope.py). Llama 3.x: factor, low_freq_factor, high_freq_factor,
  // original_max_position_embeddings. LongRoPE (Phi-3.5 / 4): a divisor per frequency and a scale of cos and sin.
  std::optional<std::array<double, 4>> rope_llama3;
  std::vector<double> rope_factors;  // a divisor per frequency (longrope, frequency_factors); empty: none
  double rope_scale = 1.0;
  int64_t rotary_dim = 0;  // leading dimensions of a head the rotary embedding turns (Phi-4-mini: 96 of 128)
  double rope_local_theta = 0;  // the sliding layers' rotary base (Gemma 3), plain RoPE; 0: none
  bool sliding = false;  // whether some layers attend within a sliding window (base.decoder.sliding_window)
};

struct ExpertEntry {
  std::string pack;  // experts/NAME@ID/pack.json
  std::string pack_sha256;
  int64_t bytes = 0;
};

struct Bundle {
  std::string root;
  Decoder decoder;
  std::string fingerprint;
  std::string quantization;  // scheme (mixed as int4) and block size: what a pack must share with it
  int n_blocks = 0;
  std::map<std::string, Component> components;  // base/embed, base/block{i}, base/head
  FileRecords files;
  int64_t base_bytes = 0;  // weight bytes of the base on disk: what the memory budget counts
  std::map<std::string, ExpertEntry> experts;
  std::optional<int64_t> eos_id;
  // tokenizer.chat.stop_ids: the chat template's end-of-turn ids (mode_edge/chat.py); nullopt without a template
  std::optional<std::vector<int64_t>> chat_stop_ids;
  std::string expert_folder(const std::string& name) const;  // root/experts/NAME@ID
};

struct Pack {
  std::string name, folder;
  int64_t version = 1;            // packs made before versions count as 1
  std::vector<Component> blocks;  // block{i}, i < n_blocks
  std::string gate;               // the gate file (safetensors), relative to folder
  FileRecords files;
};

// root/manifest.json, checked (format, version 2, ONNX with the buffer cache, every field read). Throws UserError.
Bundle read_bundle(const std::string& root);

// Every record's file under `folder` exists with its size and sha256; else UserError "WHAT is damaged: PATH ...; FIX".
void verify_files(const std::string& folder, const FileRecords& files, const std::string& what, const std::string& fix);

// Installed expert NAME's pack.json: its sha256 against the bundle's record, then its fields, its base fingerprint and
// cache interface against the bundle's; with pinned `keys`, its pack.sig (signature.h); `verify`: every file it lists
// too. Throws UserError naming the fix.
Pack read_pack(const Bundle& bundle, const std::string& name, bool verify, const PinnedKeys& keys = {});

// "reinstall its pack (`mode-edge install --bundle B NAME.modepack`)"
std::string reinstall_fix(const Bundle& bundle, const std::string& name);

// The installed experts' names, sorted.
std::vector<std::string> installed(const Bundle& bundle);

}  // namespace mode_edge
