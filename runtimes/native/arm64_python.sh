#!/bin/sh
# An arm64 userland for the Python runtime, run under qemu-aarch64-static (make test-arm64): Debian bookworm's arm64
# python3.11 and the libraries it links, extracted from their .deb files into CACHE/python-root (not installed, no
# maintainer scripts: qemu's -L prefix is the root), and aarch64 wheels of the runtime's dependencies, at the versions
# of this checkout's venv (onnxruntime 1.27.0: later ones crash under qemu-user), unpacked into CACHE/python-site.
# No chroot, no binfmt registration: `mode-edge run` starts no other program.
#   usage: arm64_python.sh CACHE PYTHON   (PYTHON: the venv's, for pip and the versions)
set -eu
CACHE=$(mkdir -p "$1" && cd "$1" && pwd) PY=$2
ROOT="$CACHE/python-root" SITE="$CACHE/python-site"
if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
  # python3.11's dependency closure, less what only a full system needs (perl, dpkg, mime-support's tools)
  "$(dirname "$0")/apt_extract.sh" "$CACHE" arm64 bookworm "$ROOT" --closure python3.11 libstdc++6
  test -x "$ROOT/usr/bin/python3.11" || { echo "python3.11:arm64 was not fetched" >&2; exit 1; }
fi
if [ ! -d "$SITE/onnxruntime" ] || [ ! -d "$SITE/jinja2" ]; then  # (jinja2: chat templates, added later)
  PINS=$("$PY" -c "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in \
    ('numpy', 'tokenizers', 'safetensors', 'psutil', 'click', 'rich', 'filelock', 'cryptography', 'jinja2')))")
  rm -rf "$CACHE/wheels" "$SITE.tmp" && mkdir -p "$CACHE/wheels" "$SITE.tmp"
  "$PY" -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp --platform any \
    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
    -d "$CACHE/wheels" $PINS onnxruntime==1.27.0 >&2
  "$PY" -c "import sys, zipfile, pathlib; [zipfile.ZipFile(w).extractall(sys.argv[2]) \
    for w in pathlib.Path(sys.argv[1]).glob('*.whl')]" "$CACHE/wheels" "$SITE.tmp"
  rm -rf "$SITE" && mv "$SITE.tmp" "$SITE" && rm -rf "$CACHE/wheels"
fi
