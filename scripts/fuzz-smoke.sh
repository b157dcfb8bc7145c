#!/usr/bin/env bash
# `make fuzz-smoke`: builds the cargo-fuzz targets in fuzz/ and runs each for
# a bounded time (FUZZ_SECONDS, default 30), starting from the committed
# seeds in fuzz/corpus/<target>. Prints the executions per target and a
# summary; exits non-zero when a target crashed (the input is kept under
# fuzz/artifacts/<target>/ — turn it into a regression test next to the code).
# Without a nightly toolchain it says so and skips (exit 0).
set -euo pipefail

cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${FUZZ_SECONDS:-30}"
# No sanitizer by default: the code under test is safe Rust (panics,
# overflow and debug assertions are what the targets catch); set
# FUZZ_SANITIZER=address for unsafe code hunting (a full rebuild).
SANITIZER="${FUZZ_SANITIZER:-none}"
TARGETS=(${FUZZ_TARGETS:-config headers ingress edge_session})
# Memory ceiling per fuzz process; a target above it is a finding too.
RSS_LIMIT_MB=2048

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz-smoke: no nightly toolchain (rustup toolchain install nightly); skipped"
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: cargo-fuzz is missing; run 'make bootstrap' (cargo install cargo-fuzz --locked)" >&2
  exit 1
fi

echo "fuzz-smoke: building ${TARGETS[*]} (sanitizer: $SANITIZER)"
(cd fuzz && cargo +nightly fuzz build -s "$SANITIZER")

declare -A EXECS RATE RESULT
failed=0
for t in "${TARGETS[@]}"; do
  work="fuzz/target/smoke-corpus/$t"
  seeds="fuzz/corpus/$t"
  mkdir -p "$work" "$seeds"
  log="fuzz/target/smoke-$t.log"
  echo "fuzz-smoke: $t for ${SECONDS_PER_TARGET}s ..."
  rc=0
  (cd fuzz && cargo +nightly fuzz run -s "$SANITIZER" "$t" \
      "../$work" "../$seeds" -- \
      -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb="$RSS_LIMIT_MB" \
      -print_final_stats=1) >"$log" 2>&1 || rc=$?
  EXECS[$t]=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  RATE[$t]=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  if [ "$rc" -eq 0 ]; then
    RESULT[$t]="ok"
  else
    RESULT[$t]="CRASH (rc $rc)"
    failed=$((failed + 1))
    echo "---- $t: last lines of $log ----"
    tail -n 40 "$log"
    ls fuzz/artifacts/"$t"/ 2>/dev/null | sed "s|^|  artifact: fuzz/artifacts/$t/|"
  fi
  echo "fuzz-smoke: $t: ${EXECS[$t]:-?} executions (${RATE[$t]:-?}/s), ${RESULT[$t]}"
done

echo
echo "fuzz-smoke summary (${SECONDS_PER_TARGET}s per target, sanitizer $SANITIZER)"
printf '  %-14s %14s %10s  %s\n' target executions exec/s result
for t in "${TARGETS[@]}"; do
  printf '  %-14s %14s %10s  %s\n' "$t" "${EXECS[$t]:-?}" "${RATE[$t]:-?}" "${RESULT[$t]}"
done
if [ "$failed" -gt 0 ]; then
  echo "fuzz-smoke: $failed target(s) crashed"
  exit 1
fi
echo "fuzz-smoke: all ${#TARGETS[@]} targets ran clean"
