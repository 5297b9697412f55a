#!/bin/sh
# Build the native runtime for aarch64 Linux (make native-arm64) into build/native-arm64, with what it runs against
# fetched once into CACHE: the aarch64 OpenSSL (Debian bookworm's libssl-dev:arm64 and libssl3:arm64, extracted, not
# installed) and the aarch64 onnxruntime wheel's libonnxruntime.so (PyPI). onnxruntime 1.27: 1.28 and later crash
# under qemu-user while reading the host's /proc/cpuinfo. Needs aarch64-linux-gnu-g++ (g++-aarch64-linux-gnu).
#   usage: cross_arm64.sh CACHE DEPS_INCLUDE BUILD_DIR PIP
set -eu
CACHE=$(mkdir -p "$1" && cd "$1" && pwd) DEPS_INCLUDE=$2 BUILD=$3 PIP=$4
ORT_VERSION=1.27.0
SYSROOT="$CACHE/sysroot"
if [ ! -f "$SYSROOT/usr/lib/aarch64-linux-gnu/libcrypto.so.3" ]; then
  "$(dirname "$0")/apt_extract.sh" "$CACHE" arm64 bookworm "$SYSROOT" libssl-dev libssl3
  test -f "$SYSROOT/usr/lib/aarch64-linux-gnu/libcrypto.so.3" || { echo "libssl3:arm64 was not fetched" >&2; exit 1; }
fi
ORT_DIR="$CACHE/onnxruntime-$ORT_VERSION"
if [ ! -f "$ORT_DIR/libonnxruntime.so" ]; then
  rm -rf "$CACHE/wheel" && mkdir -p "$CACHE/wheel"
  "$PIP" download -q "onnxruntime==$ORT_VERSION" --platform manylinux_2_27_aarch64 --only-binary=:all: --no-deps \
    --python-version 3.11 -d "$CACHE/wheel" >&2
  mkdir -p "$ORT_DIR.tmp"
  python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
name = next(n for n in z.namelist() if '/capi/libonnxruntime.so' in n); \
open(sys.argv[2], 'wb').write(z.read(name))" "$CACHE"/wheel/*.whl "$ORT_DIR.tmp/libonnxruntime.so"
  rm -rf "$ORT_DIR" && mv "$ORT_DIR.tmp" "$ORT_DIR" && rm -rf "$CACHE/wheel"
fi
cmake -S runtimes/native -B "$BUILD" -DCMAKE_TOOLCHAIN_FILE="$(pwd)/runtimes/native/toolchain-aarch64.cmake" \
  -DMODE_EDGE_DEPS_INCLUDE="$DEPS_INCLUDE" -DOPENSSL_INCLUDE_DIR="$SYSROOT/usr/include" \
  -DOPENSSL_CRYPTO_LIBRARY="$SYSROOT/usr/lib/aarch64-linux-gnu/libcrypto.so.3" \
  -DCMAKE_CXX_FLAGS="-fno-tree-loop-vectorize -isystem $SYSROOT/usr/include/aarch64-linux-gnu" > /dev/null
cmake --build "$BUILD" -j2
