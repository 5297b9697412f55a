#include "signature.h"

#include <openssl/evp.h>
#include <sys/stat.h>

#include <cctype>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "errors.h"
#include "sha256.h"

namespace mode_edge {
namespace {

constexpr const char* kPrefix = "ed25519 ";
constexpr const char* kDomain = "mode-edge-pack-signature-v1";  // mode_edge/signing.SIGNED_DOMAIN
constexpr size_t kMaxSignatureBytes = 4096;                      // mode_edge/signing.MAX_SIGNATURE_BYTES

std::string trim(const std::string& s) {
  size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// Strict base64 (the alphabet, '=' padding only at the end, length a multiple of 4), as Python's validate=True.
bool base64(const std::string& text, std::vector<unsigned char>& out) {
  if (text.empty() || text.size() % 4) return false;
  size_t pad = text.size() - text.find_last_not_of('=') - 1;
  if (pad > 2 || text.find('=') < text.size() - pad) return false;
  for (char c : text.substr(0, text.size() - pad))
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '+' && c != '/') return false;
  out.resize(text.size() / 4 * 3);
  int n = EVP_DecodeBlock(out.data(), reinterpret_cast<const unsigned char*>(text.data()), static_cast<int>(text.size()));
  if (n < 0) return false;
  out.resize(static_cast<size_t>(n) - pad);  // EVP_DecodeBlock counts the padding's zero bytes
  return true;
}

std::string slurp(const std::string& path, size_t limit, bool& too_large) {
  std::ifstream f(path, std::ios::binary);
  std::string data(limit + 1, '\0');
  f.read(&data[0], static_cast<std::streamsize>(data.size()));
  data.resize(static_cast<size_t>(f.gcount()));
  too_large = data.size() > limit;
  return data;
}

bool is_regular(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace

PinnedKeys parse_pinned_keys(const std::vector<std::string>& keys) {
  const std::string expected = "pass a .pub file from `mode-edge keys generate` or its line 'ed25519 BASE64'";
  PinnedKeys out;
  for (const std::string& given : keys) {
    std::string text = trim(given), label = "the key text given";
    if (text.rfind(kPrefix, 0) != 0 && text.find("-----BEGIN") == std::string::npos) {
      label = text.size() <= 120 ? text : text.substr(0, 117) + "...";  // a path: safe to show
      if (!is_regular(text)) throw UserError("--trust " + label + " is not a readable file; " + expected);
      bool too_large = false;
      text = trim(slurp(text, 1 << 16, too_large));
      if (too_large) throw UserError("--trust " + label + " is too large to be a public key; " + expected);
    }
    if (text.find("PRIVATE KEY-----") != std::string::npos)
      throw UserError("--trust " + label + " is a private key: keep it secret and pass its public half, the .pub file");
    std::vector<unsigned char> raw;
    if (text.rfind(kPrefix, 0) != 0 || !base64(trim(text.substr(8)), raw) || raw.size() != 32)
      throw UserError("--trust " + label + " is not an ed25519 public key; " + expected);
    out[sha256_hex(raw.data(), raw.size()).substr(0, 16)] = raw;
  }
  return out;
}

std::string check_pack_signature(const std::string& folder, const std::string& name, int64_t version,
                                 const std::string& pack_sha256, const PinnedKeys& keys, const std::string& fix) {
  std::string path = folder + "/pack.sig", what = "expert '" + name + "'", pinned;
  for (auto& [id, raw] : keys) pinned += (pinned.empty() ? "" : ", ") + id;
  if (!is_regular(path))
    throw UserError(what + " is not signed (" + path + " is missing), and only packs signed by " + pinned +
                    " load here (trusted keys); install its signed pack, or trust no keys");
  bool too_large = false;
  std::string data = slurp(path, kMaxSignatureBytes, too_large);
  nlohmann::json doc = too_large ? nlohmann::json() : nlohmann::json::parse(data, nullptr, false);
  std::vector<unsigned char> signature;
  bool ok = doc.is_object() && doc.value("algorithm", nlohmann::json()) == "ed25519" && doc.contains("key_id") &&
            doc["key_id"].is_string() && doc.contains("signature") && doc["signature"].is_string() &&
            base64(doc["signature"].get<std::string>(), signature) && signature.size() == 64;
  if (!ok)
    throw UserError(what + " (" + path + "): its signature is not an ed25519 signature; it is corrupt or forged: " + fix);
  std::string id = doc["key_id"];
  auto key = keys.find(id);
  if (key == keys.end())
    throw UserError(what + " is signed by key " + id.substr(0, 16) + ", not by a key trusted here (" + pinned +
                    "); install the pack its publisher signed, or trust their key");
  nlohmann::json body = {{"domain", kDomain}, {"name", name}, {"pack_sha256", pack_sha256}, {"version", version}};
  std::string message = body.dump();  // sorted keys (std::map), no spaces: Python's canonical form for these fields
  std::unique_ptr<EVP_PKEY, void (*)(EVP_PKEY*)> pkey(
      EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, key->second.data(), key->second.size()), EVP_PKEY_free);
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!pkey || !ctx || EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, pkey.get()) != 1)
    throw std::runtime_error("ed25519: OpenSSL could not set up the verification");
  int verified = EVP_DigestVerify(ctx.get(), signature.data(), signature.size(),
                                  reinterpret_cast<const unsigned char*>(message.data()), message.size());
  if (verified != 1)
    throw UserError(what + ": its signature by key " + id + " does not match its content (changed after signing, or "
                    "forged); refused. Get it again from its publisher");
  return id;
}

}  // namespace mode_edge
