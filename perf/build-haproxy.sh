#!/usr/bin/env bash
# Builds HAProxy with QUIC (HTTP/3) support, the reference peer of
# `make perf-io` (docs/perf.md). Optional: spooky's tests never need it.
#
#   perf/build-haproxy.sh [SOURCE] [DEST]
#
# SOURCE is a HAProxy source tree (a directory) or a git URL to clone
# (default https://github.com/haproxy/haproxy.git, its default branch:
# 3.x, where QUIC builds against stock OpenSSL through the compatibility
# layer). DEST is where a clone goes (default perf/out/haproxy-src). Needs
# make, a C compiler and libssl-dev (`apt-get install build-essential
# libssl-dev`); about a minute on 2 cores. The binary ends up at
# SOURCE/haproxy (or DEST/haproxy); the script prints its path and checks that
# `haproxy -vv` lists QUIC. Then:
#
#   make perf-io HAPROXY=/path/to/haproxy
#
# With stock OpenSSL (no QUIC TLS API) HAProxy needs `limited-quic` in its
# `global` section; perf/io_compare.py writes it.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
src="${1:-https://github.com/haproxy/haproxy.git}"
dest="${2:-$here/out/haproxy-src}"

if [ -d "$src" ]; then
  dir="$src"
else
  if [ -d "$dest/.git" ]; then
    echo "build-haproxy: reusing the clone in $dest" >&2
  else
    echo "build-haproxy: cloning $src into $dest" >&2
    git clone --depth 1 "$src" "$dest"
  fi
  dir="$dest"
fi

if [ ! -f "$dir/Makefile" ] || [ ! -d "$dir/src" ]; then
  echo "build-haproxy: $dir does not look like a HAProxy source tree" >&2
  exit 2
fi
if ! printf '#include <openssl/ssl.h>\n' | cc -E - >/dev/null 2>&1; then
  echo "build-haproxy: OpenSSL headers not found: apt-get install libssl-dev" >&2
  exit 2
fi

jobs="$(nproc 2>/dev/null || echo 2)"
echo "build-haproxy: make -j$jobs TARGET=linux-glibc USE_OPENSSL=1 USE_QUIC=1 USE_QUIC_OPENSSL_COMPAT=1 (in $dir)" >&2
make -C "$dir" -j"$jobs" TARGET=linux-glibc USE_OPENSSL=1 USE_QUIC=1 USE_QUIC_OPENSSL_COMPAT=1

bin="$dir/haproxy"
if ! "$bin" -vv 2>/dev/null | grep -q '+QUIC'; then
  echo "build-haproxy: $bin built but does not report QUIC support (haproxy -vv)" >&2
  exit 1
fi
"$bin" -v | head -1 >&2
echo "$bin"
