#!/usr/bin/env bash
# perf/profile.sh: where spooky's CPU goes under one point of the sweep.
#
# Starts three demo backends and spooky (release build, one worker, the
# perf-io config: 32 warm connections per backend), warms up, then runs
# `perf record -g` on the spooky process while `h3load -c C -m M -d D /`
# loads it, and prints the kernel/user split and the top symbols.
#
#   perf/profile.sh                      # -c 4 -m 16, 8 s, io_uring
#   C=4 M=1 D=8 DRIVER=epoll perf/profile.sh
#   OUT=/tmp/prof perf/profile.sh        # keep perf.data there
#
# Needs `perf` (linux-perf), `cargo build --release` and the perf crate's
# h3load (`cargo build --release -p spooky-perf`). Fails loudly on any
# non-2xx answer: a profile of errors is not a profile of serving.
set -euo pipefail

cd "$(dirname "$0")/.."
C=${C:-4}
M=${M:-16}
D=${D:-8}
DRIVER=${DRIVER:-uring}
PORT=${PORT:-18443}
BACKEND_BASE=${BACKEND_BASE:-19301}
ADMIN=${ADMIN:-19400}
OUT=${OUT:-$(mktemp -d /tmp/spooky-profile-XXXXXX)}
BIN=target/release
for b in spooky h3load; do
  [ -x "$BIN/$b" ] || { echo "profile: missing $BIN/$b (cargo build --release; cargo build --release -p spooky-perf)" >&2; exit 2; }
done
command -v perf >/dev/null || { echo "profile: perf is not installed" >&2; exit 2; }

mkdir -p "$OUT"
scripts/gen-cert.sh "$OUT/certs" >/dev/null
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT
backends=""
for i in 0 1 2; do
  p=$((BACKEND_BASE + i))
  "$BIN/spooky" demo-backend --listen "127.0.0.1:$p" --name "backend-$((i + 1))" >/dev/null 2>&1 &
  pids+=($!)
  backends+="      - { address: \"127.0.0.1:$p\" }"$'\n'
done
cat >"$OUT/spooky.yaml" <<YAML
listen:
  address: "127.0.0.1:$PORT"
  tls: { cert: $OUT/certs/cert.pem, key: $OUT/certs/key.pem }
  alpn: ["h3"]
quic: { idle_timeout_ms: 30000, max_streams_bidi: 256, initial_max_data: 16777216, initial_max_stream_data: 1048576, retry: false, cc: cubic, server_id: 1 }
io: { backend: $DRIVER, workers: 1, gso: true, gro: true }
upstreams:
  - name: app
    policy: round_robin
    backends:
$backends    pool: { connections_per_backend: 32, max_connections_per_backend: 64, max_concurrent_streams: 100 }
    timeouts: { connect_ms: 1000, request_ms: 30000, idle_ms: 60000 }
routes:
  - { path_prefix: "/", upstream: app }
limits: { max_connections: 100000, max_request_header_bytes: 65536, max_body_buffer_bytes: 1048576 }
admin: { address: "127.0.0.1:$ADMIN" }
watch: false
telemetry: { log: warn, log_format: text, access_log: false }
YAML
sleep 0.5
"$BIN/spooky" --config "$OUT/spooky.yaml" >"$OUT/spooky.log" 2>&1 &
sp=$!
pids+=($sp)
sleep 1
echo "profile: warm-up (2 s), then perf record of spooky ($DRIVER) over h3load -c $C -m $M -d $D /"
"$BIN/h3load" --addr "127.0.0.1:$PORT" -c "$C" -m "$M" -d 2 / >/dev/null
perf record -F 2000 -g -p "$sp" -o "$OUT/perf.data" -- sleep "$D" >/dev/null 2>&1 &
rec=$!
"$BIN/h3load" --addr "127.0.0.1:$PORT" -c "$C" -m "$M" -d "$D" / >"$OUT/h3load.txt"
wait "$rec" || true
grep -E "^status codes" "$OUT/h3load.txt"
if ! grep -qE "status codes: [0-9]+ 2xx, 0 3xx, 0 4xx, 0 5xx" "$OUT/h3load.txt"; then
  echo "profile: FAILED: non-2xx answers (see $OUT/h3load.txt)" >&2
  exit 1
fi
echo
echo "== share of samples by object (kernel vs spooky vs libc)"
perf report -i "$OUT/perf.data" --no-children --sort dso -g none 2>/dev/null | grep -E '^ +[0-9]' | head -6
echo
echo "== top 25 symbols (self time)"
perf report -i "$OUT/perf.data" --no-children --sort sym -g none 2>/dev/null | grep -E '^ +[0-9]' | head -25
echo
echo "profile: perf.data, h3load output and spooky's log in $OUT"
