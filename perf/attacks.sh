#!/usr/bin/env bash
# Issue 10's attack table, spooky and (when HAPROXY=/path is given) HAProxy
# side by side on the same backends, one target at a time:
#   - flood: 30,000 valid Initials from 1,000 source ports in 20 s, never
#     completed (perf/src/bin/quic_flood.rs): replies, RSS before / right after
#     / 10 s after, CPU;
#   - rapid reset: open-and-reset streams as fast as stream credit allows for
#     10 s, reconnecting, with a victim client alongside
#     (perf/src/bin/rapid_reset.rs): reset streams sent, how many reached a
#     backend (the demo backends' /stats), server CPU, victim p99;
#   - CPU per reset stream, like for like: ROUNDS (3) alternating rounds of
#     the rapid reset against spooky with its per-source limit lifted and
#     against HAProxy, and the median of each (see below).
# Build first: cargo build --release -p spooky -p spooky-perf.
# Usage: [FLOOD=0] [HAPROXY=/path/to/haproxy] perf/attacks.sh   (perf/build-haproxy.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release}
SPOOKY=${SPOOKY:-$BIN/spooky}
HAPROXY=${HAPROXY:-}
FLOOD_ARGS=${FLOOD_ARGS:---initials 30000 --sources 1000 --duration 20 --settle 10}
RESET_SECONDS=${RESET_SECONDS:-10}
FLOOD=${FLOOD:-1}   # FLOOD=0: rapid reset rows only
ROUNDS=${ROUNDS:-3} # rounds of the CPU-per-reset-stream comparison
for b in "$SPOOKY" "$BIN/quic_flood" "$BIN/rapid_reset"; do
  [ -x "$b" ] || { echo "attacks: $b missing; cargo build --release -p spooky -p spooky-perf" >&2; exit 1; }
done

work=$(mktemp -d /tmp/spooky-attacks.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

scripts/gen-cert.sh "$work/certs" >/dev/null
B1=19111 B2=19112
"$SPOOKY" demo-backend --listen 127.0.0.1:$B1 --name b1 >"$work/b1.log" 2>&1 & pids+=($!)
"$SPOOKY" demo-backend --listen 127.0.0.1:$B2 --name b2 >"$work/b2.log" 2>&1 & pids+=($!)
sleep 0.5

# Requests the two backends have seen (GET /stats is itself not counted).
backend_requests() {
  local n=0 s
  for p in $B1 $B2; do
    s=$(curl -s --http2-prior-knowledge "http://127.0.0.1:$p/stats" | sed 's/.*"requests":\([0-9]*\).*/\1/')
    n=$((n + ${s:-0}))
  done
  echo "$n"
}

run_attacks() { # name addr pid [admin]
  local name=$1 addr=$2 pid=$3 admin=${4:-}
  if [ "$FLOOD" = 1 ]; then
    echo "=== $name: flood ($FLOOD_ARGS)"
    # shellcheck disable=SC2086
    "$BIN/quic_flood" --mode flood --addr "$addr" --pid "$pid" $FLOOD_ARGS
  fi
  echo "=== $name: rapid reset (${RESET_SECONDS}s)"
  local before after
  before=$(backend_requests)
  "$BIN/rapid_reset" --addr "$addr" -d "$RESET_SECONDS" --pid "$pid" ${admin:+--admin "$admin"}
  after=$(backend_requests)
  echo "requests that reached a backend during the attack: $((after - before))"
}

cat >"$work/spooky.yaml" <<EOF
listen: { address: "127.0.0.1:18443", tls: { cert: certs/cert.pem, key: certs/key.pem } }
io: { workers: 1 }
upstreams:
  - name: app
    backends:
      - { address: "127.0.0.1:$B1" }
      - { address: "127.0.0.1:$B2" }
admin: { address: "127.0.0.1:19911" }
telemetry: { log: warn, access_log: false }
EOF
"$SPOOKY" --config "$work/spooky.yaml" >"$work/spooky.log" 2>&1 & spid=$!; pids+=($spid)
sleep 1.5
run_attacks "spooky $(git rev-parse --short HEAD 2>/dev/null || echo)" 127.0.0.1:18443 "$spid" 127.0.0.1:19911
kill "$spid"; wait "$spid" 2>/dev/null || true

if [ -n "$HAPROXY" ]; then
  cat "$work/certs/cert.pem" "$work/certs/key.pem" >"$work/haproxy.pem"
  cat >"$work/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
    limited-quic
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend h3
    bind quic4@127.0.0.1:18444 ssl crt $work/haproxy.pem alpn h3
    default_backend app
backend app
    server s1 127.0.0.1:$B1 proto h2
    server s2 127.0.0.1:$B2 proto h2
EOF
  "$HAPROXY" -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 & hpid=$!; pids+=($hpid)
  sleep 1
  run_attacks "HAProxy $("$HAPROXY" -v | head -1 | awk '{print $3}')" 127.0.0.1:18444 "$hpid"
fi

# CPU per reset stream, like for like: with its defaults spooky refuses
# the attacker after 20,000 abandoned streams per source, which HAProxy does
# not, so the rounds below lift the per-source limit (an attacker with many
# addresses) and keep the per-connection one (10,000, then H3_EXCESSIVE_LOAD
# and a reconnect). Rounds alternate spooky and HAProxy so that a busy host
# weighs on both; the summary is the median of each.
sed 's/^telemetry:/limits: { max_abandoned_streams_per_source: 4000000000 }\ntelemetry:/' \
  "$work/spooky.yaml" >"$work/spooky-many-sources.yaml"
"$SPOOKY" --config "$work/spooky-many-sources.yaml" >"$work/spooky-many-sources.log" 2>&1 & spid=$!; pids+=($spid)
sleep 1.5
per_reset() { sed -n 's/.* \([0-9.]*\) us per reset stream.*/\1/p'; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
: >"$work/us-spooky"; : >"$work/us-haproxy"
for round in $(seq 1 "$ROUNDS"); do
  echo "=== round $round/$ROUNDS: spooky (per-source limit lifted), rapid reset ${RESET_SECONDS}s"
  "$BIN/rapid_reset" --addr 127.0.0.1:18443 -d "$RESET_SECONDS" --pid "$spid" | tee "$work/round.txt"
  per_reset <"$work/round.txt" >>"$work/us-spooky"
  if [ -n "$HAPROXY" ]; then
    echo "=== round $round/$ROUNDS: HAProxy, rapid reset ${RESET_SECONDS}s"
    "$BIN/rapid_reset" --addr 127.0.0.1:18444 -d "$RESET_SECONDS" --pid "$hpid" | tee "$work/round.txt"
    per_reset <"$work/round.txt" >>"$work/us-haproxy"
  fi
done
kill "$spid"; wait "$spid" 2>/dev/null || true
s_us=$(median <"$work/us-spooky")
echo "=== CPU per reset stream, median of $ROUNDS rounds"
echo "spooky:  $s_us us  (rounds: $(tr '\n' ' ' <"$work/us-spooky"))"
if [ -n "$HAPROXY" ]; then
  h_us=$(median <"$work/us-haproxy")
  echo "HAProxy: $h_us us  (rounds: $(tr '\n' ' ' <"$work/us-haproxy"))"
  awk -v s="$s_us" -v h="$h_us" 'BEGIN {printf "spooky / HAProxy: %.2fx the CPU per reset stream\n", s / h}'
fi
echo "attacks: logs in $work"
