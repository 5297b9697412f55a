#include "bundle.h"

#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "errors.h"
#include "names.h"
#include "sha256.h"

namespace mode_edge {
namespace {

using nlohmann::json;

// A relative path inside its folder: no absolute path, no "..", nothing a damaged manifest could point outside with.
bool inside(const std::string& rel) {
  if (rel.empty() || rel[0] == '/' || rel.find('\\') != std::string::npos) return false;
  std::stringstream parts(rel);
  for (std::string part; std::getline(parts, part, '/');)
    if (part.empty() || part == "." || part == "..") return false;
  return true;
}

json read_json(const std::string& path, const std::string& missing, const std::string& fix) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) throw UserError(path + " is missing; " + missing);
  if (!S_ISREG(st.st_mode)) throw UserError(path + " is not a file (damaged?); " + fix);
  std::ifstream f(path, std::ios::binary);
  if (!f) throw UserError(path + " cannot be read (" + std::strerror(errno) + "); check its permissions");
  try {
    return json::parse(f);
  } catch (const std::exception&) {  // not JSON, or a read that failed midway
    throw UserError(path + " is not valid JSON (damaged?); " + fix);
  }
}

void check_version(const json& m, const std::string& format, const std::string& path, const std::string& fix) {
  if (!m.is_object() || !m.contains("format") || m["format"] != format)
    throw UserError(path + " is not a " + format + " manifest; " + fix);
  const json& v = m.contains("format_version") ? m["format_version"] : json();
  if (v == 2) return;
  bool older = v.is_number_integer() && v.get<int64_t>() < 2;
  throw UserError(path + " has format version " + v.dump() + "; the native runtime reads version 2 (ONNX graphs "
                  "with the in-place KV cache): " + (older ? fix : "upgrade mode-edge, or export it again with this one"));
}

// An integer field in [lo, hi]: a float, a string or a number out of range is refused (never cast).
int64_t integer(const json& j, const char* key, int64_t lo, int64_t hi, const std::string& path) {
  const json& v = j.at(key);
  if (!v.is_number_integer() || v.get<int64_t>() < lo || v.get<int64_t>() > hi)
    throw UserError(path + ": '" + key + "' must be an integer in " + std::to_string(lo) + " .. " + std::to_string(hi));
  return v.get<int64_t>();
}

constexpr int64_t kMaxBytes = int64_t(1) << 40;

FileRecords read_records(const json& files, const std::string& path) {
  FileRecords out;
  for (auto& [rel, rec] : files.items()) {
    if (!inside(rel)) throw UserError(path + " lists a file outside its folder: " + rel);
    out[rel] = {integer(rec, "bytes", 0, kMaxBytes, path), rec.at("sha256").get<std::string>()};
  }
  return out;
}

bool positive(const json& v) {
  return v.is_number() && !v.is_boolean() && v.get<double>() > 0 && std::isfinite(v.get<double>());
}

// base.decoder.rope_scaling (mode_edge/rope.check_rope_scaling): llama3, longrope or frequency_factors (a GGUF's
// per-frequency divisors), every number positive.
void read_rope_scaling(const json& s, Decoder& d, const std::string& path) {
  std::string kind = s.is_object() && s.contains("rope_type") && s["rope_type"].is_string() ? s["rope_type"] : "";
  bool ok = false;
  if (kind == "llama3") {
    const char* keys[] = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"};
    std::array<double, 4> v{};
    ok = true;
    for (int i = 0; ok && i < 4; i++) {
      ok = s.contains(keys[i]) && positive(s[keys[i]]);
      if (ok) v[i] = s[keys[i]].get<double>();
    }
    ok = ok && v[2] > v[1];
    if (ok) d.rope_llama3 = v;
  } else if (kind == "longrope" || kind == "frequency_factors") {  // each frequency divided by its own factor
    bool longrope = kind == "longrope";
    // LongRoPE records the one factor set its context takes: short within the original context, long past it
    bool is_long = longrope && s.contains("long_factor");
    const char* key = !longrope ? "factors" : is_long ? "long_factor" : "short_factor";
    const json& f = s.contains(key) ? s[key] : json();
    ok = (!longrope || (s.contains("attention_factor") && positive(s["attention_factor"]))) && f.is_array() &&
         static_cast<int64_t>(f.size()) == d.rotary_dim / 2 && !(is_long && s.contains("short_factor"));
    for (size_t i = 0; ok && i < f.size(); i++) ok = positive(f[i]);
    if (ok) {
      for (auto& v : f) d.rope_factors.push_back(v.get<double>());
      d.rope_scale = longrope ? s["attention_factor"].get<double>() : 1.0;
    }
  }
  if (!ok)
    throw UserError(path + " holds a base.decoder.rope_scaling the native runtime cannot use (llama3, longrope or "
                    "frequency_factors, every factor positive); " + kReexport);
}

// What a pack must share with its bundle (mode_edge/bundle._precision): scheme (mixed counts as int4) and block size.
std::string precision(const json& q) {
  if (!q.is_object()) return q.dump();
  std::string scheme = q.contains("scheme") ? q["scheme"].dump() : "null";
  if (scheme == "\"mixed\"") scheme = "\"int4\"";
  return scheme + " (block " + (q.contains("block_size") ? q["block_size"].dump() : "null") + ")";
}

Component read_component(const json& c, const FileRecords& files, const std::string& path) {
  Component out;
  out.layers = static_cast<int>(integer(c, "layers", 0, 4096, path));
  out.inputs = c.at("inputs").at("onnx").get<std::vector<std::string>>();
  out.outputs = c.at("outputs").at("onnx").get<std::vector<std::string>>();
  out.onnx = c.at("onnx").get<std::string>();
  if (!files.count(out.onnx)) throw UserError(path + " names a graph it does not list: " + out.onnx);
  out.optimized_ahead = c.contains("onnx_optimized") && c["onnx_optimized"] == "extended";
  return out;
}

// Fields read under one try: a missing or mistyped one is named, with the fix.
template <class F>
auto fields(const std::string& path, const std::string& fix, F read) {
  try {
    return read();
  } catch (const json::exception& e) {
    throw UserError(path + " lacks a field the runtime reads or has one of the wrong type (" +
                    std::string(e.what()) + "); " + fix);
  }
}

}  // namespace

std::string Bundle::expert_folder(const std::string& name) const {
  const std::string& pack = experts.at(name).pack;
  return root + "/" + pack.substr(0, pack.rfind('/'));
}

std::string reinstall_fix(const Bundle& bundle, const std::string& name) {
  return "reinstall its pack (`mode-edge install --bundle " + bundle.root + " " + name + ".modepack`)";
}

std::vector<std::string> installed(const Bundle& bundle) {
  std::vector<std::string> out;
  for (auto& [name, entry] : bundle.experts) out.push_back(name);
  return out;
}

Bundle read_bundle(const std::string& root) {
  struct stat st;
  if (stat(root.c_str(), &st) != 0) throw UserError("bundle " + root + " does not exist; create one with `mode-edge export`");
  if (!S_ISDIR(st.st_mode))
    throw UserError("bundle " + root + " is a file; a bundle is the folder `mode-edge export --out` made (the one "
                    "holding manifest.json)");
  std::string path = root + "/manifest.json";
  json m = read_json(path, "this folder is not a mode-edge bundle (`mode-edge export`)", kReexport);
  return fields(path, kReexport, [&] {
    check_version(m, "mode-edge-bundle", path, kReexport);
    Bundle b;
    b.root = root;
    if (!m.at("kv_cache").contains("onnx") || m["kv_cache"]["onnx"] != "buffer")
      throw UserError("bundle " + root + " has no ONNX graphs with the in-place KV cache; export it with --format "
                      "onnx (the native runtime runs ONNX graphs)");
    const json& d = m.at("base").at("decoder");
    const int64_t big = int64_t(1) << 24;  // far above any phone-sized model, far below an overflow
    b.decoder = {integer(d, "vocab_size", 1, big, path), integer(d, "dim", 1, big, path),
                 integer(d, "n_kv_heads", 1, 4096, path), integer(d, "head_dim", 2, 4096, path),
                 integer(d, "max_seq_len", 1, big, path), d.at("rope_theta").get<double>(), std::nullopt, {}, 1.0};
    b.decoder.rotary_dim = d.contains("rotary_dim") && !d["rotary_dim"].is_null()
                               ? integer(d, "rotary_dim", 2, b.decoder.head_dim, path) : b.decoder.head_dim;
    if (b.decoder.head_dim % 2 || b.decoder.rotary_dim % 2 || !(b.decoder.rope_theta > 0) ||
        !std::isfinite(b.decoder.rope_theta))
      throw UserError(path + " holds an impossible base.decoder (head_dim or rotary_dim odd, or rope_theta not > 0); " +
                      kReexport);
    if (d.contains("rope_scaling") && !d["rope_scaling"].is_null()) read_rope_scaling(d["rope_scaling"], b.decoder, path);
    // Gemma 3's sliding layers turn by their own base (plain RoPE): a second pair of tables. Its other layer
    // differences (norms, GeGLU, scales, the window) are inside the graphs.
    if (d.contains("rope_local_theta") && !d["rope_local_theta"].is_null()) {
      if (!positive(d["rope_local_theta"]))
        throw UserError(path + " holds an impossible base.decoder.rope_local_theta (not > 0); " + kReexport);
      b.decoder.rope_local_theta = d["rope_local_theta"].get<double>();
    }
    b.decoder.sliding = d.contains("sliding_window") && !d["sliding_window"].is_null();
    b.fingerprint = m.at("base").at("fingerprint");
    b.n_blocks = static_cast<int>(m.at("base").at("block_ranges").size());
    if (b.n_blocks < 1) throw UserError(path + " lists no blocks (base.block_ranges); " + kReexport);
    b.files = read_records(m.at("files"), path);
    for (auto& [rel, rec] : b.files) b.base_bytes += rec.bytes;
    std::vector<std::string> names = {"base/embed", "base/head"};
    for (int i = 0; i < b.n_blocks; i++) names.push_back("base/block" + std::to_string(i));
    for (auto& name : names) b.components[name] = read_component(m.at("components").at(name), b.files, path);
    b.quantization = precision(m.at("quantization"));
    for (auto& [name, e] : m.at("experts").items()) {
      if (!plain_name(name)) throw UserError(path + " lists an expert named '" + name + "' (corrupt?); " + kReexport);
      ExpertEntry entry{e.at("pack"), e.at("pack_sha256"), integer(e, "bytes", 0, kMaxBytes, path)};
      std::string pack = entry.pack;
      bool named = pack.rfind("experts/" + name, 0) == 0 && pack.size() > 10 && pack.substr(pack.size() - 10) == "/pack.json";
      if (!inside(pack) || !named) throw UserError(path + " names a pack outside experts/: " + pack + "; " + kReexport);
      b.experts[name] = entry;
    }
    const json& tok = m.at("tokenizer");
    if (tok.contains("eos_id") && !tok["eos_id"].is_null()) b.eos_id = integer(tok, "eos_id", 0, big, path);
    if (tok.contains("chat") && !tok["chat"].is_null()) {
      std::vector<int64_t> stops;
      if (!tok["chat"].at("stop_ids").is_array())
        throw UserError(path + ": tokenizer.chat.stop_ids is not a list of token ids; " + kReexport);
      for (const json& id : tok["chat"].at("stop_ids")) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= b.decoder.vocab_size)
          throw UserError(path + ": tokenizer.chat.stop_ids holds " + id.dump() + ", not a token id; " + kReexport);
        stops.push_back(id.get<int64_t>());
      }
      b.chat_stop_ids = stops;
    }
    return b;
  });
}

void verify_files(const std::string& folder, const FileRecords& files, const std::string& what, const std::string& fix) {
  for (auto& [rel, rec] : files) {
    std::string path = folder + "/" + rel;
    struct stat st;
    if (lstat(path.c_str(), &st) != 0) throw UserError(what + " is damaged: " + path + " is missing; " + fix);
    if (!S_ISREG(st.st_mode))  // a link could point anywhere; a FIFO would block the read
      throw UserError(what + " is damaged: " + path + " is not a regular file; " + fix);
    if (st.st_size != rec.bytes)
      throw UserError(what + " is damaged: " + path + " has " + std::to_string(st.st_size) + " bytes, not " +
                      std::to_string(rec.bytes) + " (cut short or changed); " + fix);
    if (sha256_file(path) != rec.sha256)
      throw UserError(what + " is damaged: " + path + " does not match its sha256 (corrupted); " + fix);
  }
}

Pack read_pack(const Bundle& bundle, const std::string& name, bool verify, const PinnedKeys& keys) {
  auto entry = bundle.experts.find(name);
  if (entry == bundle.experts.end()) {
    std::string list;
    for (auto& n : installed(bundle)) list += (list.empty() ? "" : ", ") + n;
    throw UserError("expert '" + name + "' is not installed in " + bundle.root + " (installed: " +
                    (list.empty() ? "none" : list) + "); install its pack with `mode-edge install`");
  }
  std::string folder = bundle.expert_folder(name), path = folder + "/pack.json", fix = reinstall_fix(bundle, name);
  std::string what = "expert '" + name + "'";
  struct stat st;
  if (stat(path.c_str(), &st) == 0 && sha256_file(path) != entry->second.pack_sha256)
    throw UserError(what + " is damaged: " + path + " does not match its sha256; " + fix);
  json m = read_json(path, fix, fix);
  Pack p = fields(path, fix, [&] {
    check_version(m, "mode-edge-pack", path, fix);
    Pack p;
    p.name = name;
    p.folder = folder;
    if (m.contains("version")) p.version = integer(m, "version", 1, int64_t(1) << 53, path);
    p.files = read_records(m.at("files"), path);
    for (int i = 0; i < bundle.n_blocks; i++)
      p.blocks.push_back(read_component(m.at("components").at("block" + std::to_string(i)), p.files, path));
    p.gate = m.at("gate");
    std::string fingerprint = m.contains("base_fingerprint") ? m["base_fingerprint"].dump() : "null";
    if (m.contains("base_fingerprint") && m["base_fingerprint"].is_string()) fingerprint = m["base_fingerprint"];
    if (fingerprint != bundle.fingerprint)
      throw UserError(what + " in " + bundle.root + " was made for base fingerprint " +
                      fingerprint.substr(0, 16) + ", this bundle's base is " +
                      bundle.fingerprint.substr(0, 16) + "; install it only into a bundle of the base it was trained on");
    if (!m.at("kv_cache").contains("onnx") || m["kv_cache"]["onnx"] != "buffer")
      throw UserError(path + " has no in-place cache graphs; " + fix);
    if (precision(m.at("quantization")) != bundle.quantization)
      throw UserError(what + " in " + bundle.root + " is quantized " + precision(m["quantization"]) + ", the bundle " +
                      bundle.quantization + "; export the expert with the bundle's --quant and --block-size");
    return p;
  });
  if (!p.files.count(p.gate)) throw UserError(path + " names a gate file it does not list; " + fix);
  if (!keys.empty()) check_pack_signature(folder, name, p.version, entry->second.pack_sha256, keys, fix);
  if (verify) verify_files(folder, p.files, what, fix);
  return p;
}

}  // namespace mode_edge
