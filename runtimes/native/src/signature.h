// Pack signatures checked at load against public keys the app pins (not the bundle's own trust store, which lives in
// the writable bundle and which install consults): the statement, key ids and pack.sig of mode_edge/signing.py,
// verified with OpenSSL's Ed25519 (RFC 8032) through EVP_DigestVerify.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace mode_edge {

using PinnedKeys = std::map<std::string, std::vector<unsigned char>>;  // key id (16 hex digits) -> 32 raw bytes

// Each key is a .pub file from `mode-edge keys generate` or its line "ed25519 BASE64". Throws UserError naming the
// key (a path, never inline key text) for a private key, a missing file or anything that is not an ed25519 key.
PinnedKeys parse_pinned_keys(const std::vector<std::string>& keys);

// The id of the pinned key whose signature FOLDER/pack.sig is, over {domain, name, pack_sha256, version} as canonical
// JSON (sorted keys, no spaces). pack_sha256: of the pack.json bytes checked against the bundle manifest. Throws
// UserError for a missing, malformed, foreign or non-matching signature.
std::string check_pack_signature(const std::string& folder, const std::string& name, int64_t version,
                                 const std::string& pack_sha256, const PinnedKeys& keys, const std::string& fix);

}  // namespace mode_edge
