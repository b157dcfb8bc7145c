#!/usr/bin/env bash
# Starts three demo backends and spooky on config.yaml in the foreground.
# Ctrl-C stops everything.
set -euo pipefail
BIN="${SPOOKY_BIN:-target/release/spooky}"
CONFIG="${CONFIG:-config.yaml}"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

for i in 1 2 3; do
  "$BIN" demo-backend --listen "127.0.0.1:900$i" --name "backend-$i" &
  pids+=($!)
done
"$BIN" check --config "$CONFIG" >/dev/null
cat <<MSG

  spooky is starting on UDP :8443 (HTTP/3), admin on http://127.0.0.1:9901
  Try, in another terminal:

    mkdir -p /tmp/spooky-demo && gtlsclient -q --exit-on-all-streams-close --download=/tmp/spooky-demo \\
        127.0.0.1 8443 https://localhost:8443/ https://localhost:8443/id
    cat /tmp/spooky-demo/index.html /tmp/spooky-demo/id
    curl -s http://127.0.0.1:9901/metrics | grep spooky_requests

  Ctrl-C stops spooky and the demo backends.

MSG
"$BIN" --config "$CONFIG" &
pids+=($!)
wait "${pids[-1]}"
