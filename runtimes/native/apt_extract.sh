#!/bin/sh
# Download Debian packages and extract them into a folder, without installing anything: apt-get with a private state
# under CACHE (the system's sources and package lists untouched) and Debian's archive keyring for the signatures,
# then dpkg-deb -x each .deb into DEST (no maintainer scripts). Used for build-time headers (fetch_deps.sh) and the
# arm64 sysroot and userland (cross_arm64.sh, arm64_python.sh).
#   usage: apt_extract.sh CACHE ARCH SUITE DEST [--closure] PACKAGE...
#   --closure: the packages and everything they depend on (no recommends), less what only a full system needs
set -eu
CACHE=$1 ARCH=$2 SUITE=$3 DEST=$4
shift 4
CLOSURE=0
if [ "${1:-}" = "--closure" ]; then CLOSURE=1; shift; fi
APT="$CACHE/apt-$ARCH-$SUITE"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial"
rm -rf "$APT/debs" && mkdir -p "$APT/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main" \
  > "$APT/sources.list"
OPTS="-o Dir::State=$APT -o Dir::State::Lists=$APT/lists -o Dir::Cache=$APT/cache -o Dir::Etc::SourceParts=/dev/null
  -o Dir::Etc::SourceList=$APT/sources.list -o APT::Architectures=$ARCH -o APT::Architecture=$ARCH
  -o Debug::NoLocking=1 -q"
apt-get $OPTS update >&2
PKGS="$*"
if [ $CLOSURE = 1 ]; then
  PKGS=$(apt-cache $OPTS depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
    --no-enhances "$@" | grep -v '^ \|<' | sort -u \
    | grep -v -x -e dpkg -e tar -e install-info -e mailcap -e mime-support -e 'perl.*' -e 'libperl.*')
fi
(cd "$APT/debs" && apt-get $OPTS download $PKGS 2>&1 | grep -v unsandboxed >&2 || true)
rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
for deb in "$APT"/debs/*.deb; do dpkg-deb -x "$deb" "$DEST.tmp"; done
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST" && rm -rf "$APT/debs"
