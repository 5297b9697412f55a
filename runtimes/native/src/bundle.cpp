#include "bundle.h"

#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include "errors.h"
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
  std::ifstream f(path, std::ios::binary);
  if (!f) throw UserError(path + " is missing; " + missing);
  try {
    return json::parse(f);
  } catch (const json::exception&) {
    throw UserError(path + " is not valid JSON (damaged?); " + fix);
  }
}

void check_version(const json& m, const std::string& format, const std::string& path, const std::string& fix) {
  if (!m.is_object() || m.value("format", "") != format)
    throw UserError(path + " is not a " + format + " manifest; " + fix);
  int version = m.value("format_version", 0);
  if (version != 2)
    throw UserError(path + " has format version " + std::to_string(version) +
                    "; the native runtime reads version 2 (ONNX graphs with the in-place KV cache): " + fix);
}

FileRecords read_records(const json& files, const std::string& path) {
  FileRecords out;
  for (auto& [rel, rec] : files.items()) {
    if (!inside(rel)) throw UserError(path + " lists a file outside its folder: " + rel);
    out[rel] = {rec.at("bytes").get<int64_t>(), rec.at("sha256").get<std::string>()};
  }
  return out;
}

Component read_component(const json& c, const FileRecords& files, const std::string& path) {
  Component out;
  out.layers = c.at("layers").get<int>();
  out.inputs = c.at("inputs").at("onnx").get<std::vector<std::string>>();
  out.outputs = c.at("outputs").at("onnx").get<std::vector<std::string>>();
  out.onnx = c.at("onnx").get<std::string>();
  if (!files.count(out.onnx)) throw UserError(path + " names a graph it does not list: " + out.onnx);
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
  check_version(m, "mode-edge-bundle", path, kReexport);
  return fields(path, kReexport, [&] {
    Bundle b;
    b.root = root;
    if (m.at("kv_cache").value("onnx", "") != "buffer")
      throw UserError("bundle " + root + " has no ONNX graphs with the in-place KV cache; export it with --format "
                      "onnx (the native runtime runs ONNX graphs)");
    const json& d = m.at("base").at("decoder");
    b.decoder = {d.at("vocab_size"), d.at("dim"), d.at("n_kv_heads"), d.at("head_dim"), d.at("max_seq_len"),
                 d.at("rope_theta")};
    b.fingerprint = m.at("base").at("fingerprint");
    b.n_blocks = static_cast<int>(m.at("base").at("block_ranges").size());
    b.files = read_records(m.at("files"), path);
    for (auto& [rel, rec] : b.files) b.base_bytes += rec.bytes;
    std::vector<std::string> names = {"base/embed", "base/head"};
    for (int i = 0; i < b.n_blocks; i++) names.push_back("base/block" + std::to_string(i));
    for (auto& name : names) b.components[name] = read_component(m.at("components").at(name), b.files, path);
    for (auto& [name, e] : m.at("experts").items()) {
      ExpertEntry entry{e.at("pack"), e.at("pack_sha256"), e.at("bytes"), e.value("version", 1)};
      std::string pack = entry.pack;
      bool named = pack.rfind("experts/" + name, 0) == 0 && pack.size() > 10 && pack.substr(pack.size() - 10) == "/pack.json";
      if (!inside(pack) || !named) throw UserError(path + " names a pack outside experts/: " + pack + "; " + kReexport);
      b.experts[name] = entry;
    }
    const json& tok = m.at("tokenizer");
    if (tok.contains("eos_id") && !tok["eos_id"].is_null()) b.eos_id = tok["eos_id"].get<int64_t>();
    return b;
  });
}

void verify_files(const std::string& folder, const FileRecords& files, const std::string& what, const std::string& fix) {
  for (auto& [rel, rec] : files) {
    std::string path = folder + "/" + rel;
    struct stat st;
    if (stat(path.c_str(), &st) != 0) throw UserError(what + " is damaged: " + path + " is missing; " + fix);
    if (st.st_size != rec.bytes)
      throw UserError(what + " is damaged: " + path + " has " + std::to_string(st.st_size) + " bytes, not " +
                      std::to_string(rec.bytes) + " (cut short or changed); " + fix);
    if (sha256_file(path) != rec.sha256)
      throw UserError(what + " is damaged: " + path + " does not match its sha256 (corrupted); " + fix);
  }
}

Pack read_pack(const Bundle& bundle, const std::string& name, bool verify) {
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
  json m = read_json(path, "the expert's manifest is missing; " + fix, fix);
  check_version(m, "mode-edge-pack", path, fix);
  Pack p = fields(path, fix, [&] {
    Pack p;
    p.name = name;
    p.folder = folder;
    p.files = read_records(m.at("files"), path);
    for (int i = 0; i < bundle.n_blocks; i++)
      p.blocks.push_back(read_component(m.at("components").at("block" + std::to_string(i)), p.files, path));
    p.gate = m.at("gate");
    if (m.value("base_fingerprint", "") != bundle.fingerprint)
      throw UserError(what + " in " + bundle.root + " was made for base fingerprint " +
                      m.value("base_fingerprint", "").substr(0, 16) + ", this bundle's base is " +
                      bundle.fingerprint.substr(0, 16) + "; install it only into a bundle of the base it was trained on");
    if (m.at("kv_cache").value("onnx", "") != "buffer") throw UserError(path + " has no in-place cache graphs; " + fix);
    return p;
  });
  if (!p.files.count(p.gate)) throw UserError(path + " names a gate file it does not list; " + fix);
  if (verify) verify_files(folder, p.files, what, fix);
  return p;
}

}  // namespace mode_edge
