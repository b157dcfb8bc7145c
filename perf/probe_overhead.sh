#!/usr/bin/env bash
# What an attached USDT probe costs: requests per spooky CPU-second under
# `h3load -c 4 -m 16`, alternating rounds with no script and with a bpftrace
# script counting `request_done` (which must see exactly the requests served).
# Needs root and bpftrace. Build first: cargo build --release -p spooky -p spooky-perf.
# Usage: perf/probe_overhead.sh [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
R=${BIN:-target/release}
ROUNDS=${1:-3} SECS=${2:-8}
TCK=$(getconf CLK_TCK)
work=$(mktemp -d /tmp/spooky-probe-overhead.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
scripts/gen-cert.sh "$work/certs" >/dev/null
for i in 1 2 3; do
  "$R/spooky" demo-backend --listen 127.0.0.1:1912$i --name b$i >/dev/null 2>&1 & pids+=($!)
done
cat >"$work/spooky.yaml" <<YAML
listen: { address: "127.0.0.1:18453", tls: { cert: certs/cert.pem, key: certs/key.pem } }
io: { workers: 1 }
upstreams:
  - name: app
    backends:
      - { address: "127.0.0.1:19121" }
      - { address: "127.0.0.1:19122" }
      - { address: "127.0.0.1:19123" }
admin: { address: "127.0.0.1:19921" }
telemetry: { log: warn, access_log: false }
YAML
"$R/spooky" --config "$work/spooky.yaml" >"$work/spooky.log" 2>&1 & SP=$!; pids+=($SP)
sleep 2
cpu() { awk '{print $14+$15}' "/proc/$SP/stat"; }
declare -a plain traced
run() { # label -> prints requests per CPU-second
  local c0 c1 n
  c0=$(cpu)
  n=$("$R/h3load" -c 4 -m 16 -d "$SECS" --addr 127.0.0.1:18453 / 2>/dev/null | awk '/^requests:/ {print $4}')
  c1=$(cpu)
  python3 -c "print(round($n / (($c1 - $c0) / $TCK)))"
  echo "$n" >"$work/last-n"
}
for r in $(seq "$ROUNDS"); do
  p=$(run); plain+=("$p")
  bpftrace -p "$SP" -e 'usdt:*:spooky:request_done { @n = count(); }' >"$work/bt.out" 2>&1 & BT=$!
  sleep 4
  t=$(run); traced+=("$t")
  kill -INT "$BT"; wait "$BT" || true
  seen=$(awk '/^@n:/ {print $2}' "$work/bt.out")
  echo "round $r: no script ${p} req/CPU-s, request_done counter ${t} req/CPU-s (script saw ${seen:-?} of $(cat "$work/last-n") requests)"
done
python3 - "${plain[*]}" "${traced[*]}" <<'PY'
import sys
p = [float(x) for x in sys.argv[1].split()]; t = [float(x) for x in sys.argv[2].split()]
print(f"probe overhead: mean {sum(t)/len(t):.0f} vs {sum(p)/len(p):.0f} req/CPU-s = {sum(t)/len(t)/(sum(p)/len(p)):.2f}x with the script attached")
PY
