#!/bin/sh
# Fetch the build-time headers of the native runtime into a cache outside the checkout (nothing of theirs is
# committed): onnxruntime's C/C++ API headers (Debian's libonnxruntime-dev) and nlohmann/json (nlohmann-json3-dev),
# by apt_extract.sh (a private apt state, Debian's archive keyring: a Debian or Debian-based host with apt-get and
# dpkg-deb is needed; elsewhere, point MODE_EDGE_DEPS_INCLUDE of CMake at any onnxruntime >= 1.23 and nlohmann/json).
# sid moves: any onnxruntime header version of C API >= 23 serves. Prints the include folder.
#   usage: fetch_deps.sh CACHE_DIR
set -eu
CACHE=$(mkdir -p "${1:?usage: fetch_deps.sh CACHE_DIR}" && cd "$1" && pwd)
INCLUDE="$CACHE/include"
if [ -f "$INCLUDE/onnxruntime/onnxruntime_cxx_api.h" ] && [ -f "$INCLUDE/nlohmann/json.hpp" ]; then
  echo "$INCLUDE"; exit 0
fi
# sid carries libonnxruntime-dev (bookworm does not); any API version >= 23 serves (runtimes/native/src/ort.cpp)
"$(dirname "$0")/apt_extract.sh" "$CACHE" amd64 sid "$CACHE/x" libonnxruntime-dev nlohmann-json3-dev
for header in onnxruntime/onnxruntime_cxx_api.h nlohmann/json.hpp; do
  test -f "$CACHE/x/usr/include/$header" || { echo "$header was not fetched" >&2; exit 1; }
done
rm -rf "$INCLUDE" && mv "$CACHE/x/usr/include" "$INCLUDE" && rm -rf "$CACHE/x"
echo "$INCLUDE"
