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
  APT="$CACHE/python-apt"
  mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main" \
    > "$APT/sources.list"
  set -- -o "Dir::State=$APT" -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" \
    -o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=/dev/null" -o "APT::Architectures=arm64" \
    -o "APT::Architecture=arm64" -o "Debug::NoLocking=1" -q
  apt-get "$@" update >&2
  # python3.11's dependency closure without what only a full system needs (perl, dpkg, mime-support's tools)
  PKGS=$(apt-cache "$@" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
    --no-enhances python3.11 libstdc++6 | grep -v '^ \|<' | sort -u \
    | grep -v -x -e dpkg -e tar -e install-info -e mailcap -e mime-support -e 'perl.*' -e 'libperl.*')
  (cd "$APT/debs" && apt-get "$@" download $PKGS 2>&1 | grep -v unsandboxed >&2 || true)
  rm -rf "$ROOT.tmp" && mkdir -p "$ROOT.tmp"
  for deb in "$APT"/debs/*.deb; do dpkg-deb -x "$deb" "$ROOT.tmp"; done
  test -x "$ROOT.tmp/usr/bin/python3.11" || { echo "python3.11:arm64 was not fetched" >&2; exit 1; }
  rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT" && rm -rf "$APT/debs"
fi
if [ ! -d "$SITE/onnxruntime" ]; then
  PINS=$("$PY" -c "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in \
    ('numpy', 'tokenizers', 'safetensors', 'psutil', 'click', 'rich', 'filelock', 'cryptography')))")
  rm -rf "$CACHE/wheels" "$SITE.tmp" && mkdir -p "$CACHE/wheels" "$SITE.tmp"
  "$PY" -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp --platform any \
    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
    -d "$CACHE/wheels" $PINS onnxruntime==1.27.0 >&2
  "$PY" -c "import sys, zipfile, pathlib; [zipfile.ZipFile(w).extractall(sys.argv[2]) \
    for w in pathlib.Path(sys.argv[1]).glob('*.whl')]" "$CACHE/wheels" "$SITE.tmp"
  rm -rf "$SITE" && mv "$SITE.tmp" "$SITE" && rm -rf "$CACHE/wheels"
fi
