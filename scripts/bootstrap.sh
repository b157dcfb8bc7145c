#!/usr/bin/env bash
# Installs the system packages spooky's build and test suite need, only when missing.
# Build: cmake + clang + libclang-dev (BoringSSL via the `boring` crate, bindgen).
# Tests/run: gtlsclient (ngtcp2-client), h2load (nghttp2-client), nginx-light (h2c peer),
# openssl (demo certificates), curl (admin API), strace (perf: syscalls per request),
# prometheus (promtool + a real scraping server for tests/e2e_control.rs),
# bpftrace (tests/e2e_probes.rs attaches ebpf-probes/*.bt to the USDT probes).
# cargo-fuzz where a nightly toolchain exists (make fuzz-smoke).
set -euo pipefail

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

have_cmd cmake || need+=(cmake)
have_cmd clang || need+=(clang)
have_pkg libclang-dev || need+=(libclang-dev)
have_cmd gtlsclient || need+=(ngtcp2-client)
have_cmd h2load || need+=(nghttp2-client)
have_cmd openssl || need+=(openssl)
have_cmd nginx || need+=(nginx-light)
have_cmd strace || need+=(strace)
have_cmd curl || need+=(curl)
have_cmd promtool || need+=(prometheus)
have_cmd make || need+=(make)
have_cmd bpftrace || need+=(bpftrace)

# cargo-fuzz (make fuzz-smoke) from crates.io, only where a nightly toolchain
# exists to run it; without nightly, fuzz-smoke says so and skips.
if have_cmd rustup && rustup toolchain list 2>/dev/null | grep -q '^nightly' \
  && ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "bootstrap: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if have_cmd sudo; then SUDO="sudo"; else
    echo "bootstrap: need root or sudo to install: ${need[*]}" >&2; exit 1
  fi
fi
echo "bootstrap: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "bootstrap: done"
