// sha256 of files, by OpenSSL's EVP interface (libcrypto): the bundle's and packs' records are checked before any
// graph is loaded, as the Python runtime does (mode_edge/integrity.py).
#pragma once
#include <cstddef>
#include <string>

namespace mode_edge {

// Lowercase hex sha256 of the file at `path`; throws UserError when it cannot be read.
std::string sha256_file(const std::string& path);

// Lowercase hex sha256 of `size` bytes at `data`.
std::string sha256_hex(const unsigned char* data, size_t size);

}  // namespace mode_edge
