#!/bin/sh
# Fetch the build-time headers of the native runtime into a cache outside the checkout (nothing of theirs is
# committed): onnxruntime's C/C++ API headers (Debian's libonnxruntime-dev) and nlohmann/json (nlohmann-json3-dev).
# apt-get runs with a private state folder, so the system's sources and package lists stay untouched; apt checks the
# archive's signatures with Debian's archive keyring (so a Debian or Debian-based host with apt-get and dpkg-deb is
# needed; elsewhere, point MODE_EDGE_DEPS_INCLUDE of CMake at any onnxruntime >= 1.23 and nlohmann/json headers).
# sid moves: any onnxruntime header version of C API >= 23 serves. Prints the include folder.
#   usage: fetch_deps.sh CACHE_DIR
set -eu
CACHE=$(mkdir -p "${1:?usage: fetch_deps.sh CACHE_DIR}" && cd "$1" && pwd)
INCLUDE="$CACHE/include"
if [ -f "$INCLUDE/onnxruntime/onnxruntime_cxx_api.h" ] && [ -f "$INCLUDE/nlohmann/json.hpp" ]; then
  echo "$INCLUDE"; exit 0
fi
APT="$CACHE/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs"
# sid carries libonnxruntime-dev (bookworm does not); any API version >= 23 serves (runtimes/native/src/ort.cpp)
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" \
  > "$APT/sources.list"
set -- -o "Dir::State=$APT" -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" \
  -o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=/dev/null" -o "Debug::NoLocking=1" -q
apt-get "$@" update >&2
(cd "$APT/debs" && apt-get "$@" download libonnxruntime-dev nlohmann-json3-dev 2>&1 | grep -v "unsandboxed" >&2 || true)
rm -rf "$CACHE/x.tmp" && mkdir -p "$CACHE/x.tmp"
for deb in "$APT"/debs/*.deb; do dpkg-deb -x "$deb" "$CACHE/x.tmp"; done
test -f "$CACHE/x.tmp/usr/include/onnxruntime/onnxruntime_cxx_api.h" || { echo "libonnxruntime-dev was not fetched" >&2; exit 1; }
test -f "$CACHE/x.tmp/usr/include/nlohmann/json.hpp" || { echo "nlohmann-json3-dev was not fetched" >&2; exit 1; }
rm -rf "$INCLUDE" && mv "$CACHE/x.tmp/usr/include" "$INCLUDE" && rm -rf "$CACHE/x.tmp" "$APT/debs"
echo "$INCLUDE"
