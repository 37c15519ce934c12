#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (verify, decode, mapping), each for
# FUZZ_SECONDS (default 60), and prints executions, coverage, corpus size
# and any crash (minimized, with its panic message). Exits non-zero on a
# crash, a hang or a failed build.
#
#   scripts/fuzz.sh                         # every target, 60 s each
#   FUZZ_SECONDS=180 scripts/fuzz.sh decode # one target, 3 min
#
# Environment:
#   FUZZ_SECONDS    seconds per target (default 60)
#   FUZZ_SANITIZER  address | none (default: address if it builds here, else none)
#   FUZZ_TIMEOUT    seconds one input may take before it counts as a hang (default 10)
#   FUZZ_JOBS       cargo build jobs (default 2)
#
# Only a stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets cargo-fuzz's
# nightly flags (-Zsanitizer, sancov passes) through. Corpora grow in
# fuzz/corpus/<target> (gitignored), seeded from fuzz/seeds/<target>
# (committed; scripts/fuzz-seeds.py regenerates them); crashes land in
# fuzz/artifacts/<target>.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_PER_TARGET=${FUZZ_SECONDS:-60}
TIMEOUT=${FUZZ_TIMEOUT:-10}
export CARGO_BUILD_JOBS=${FUZZ_JOBS:-2}
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(verify decode mapping)
fi
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

LOGS=$ROOT/fuzz/logs
mkdir -p "$LOGS"

build() { # sanitizer
  nice cargo fuzz build -s "$1" -a >"$LOGS/build-$1.log" 2>&1
}

SAN=${FUZZ_SANITIZER:-}
if [ -z "$SAN" ]; then
  echo "== building with the address sanitizer"
  if build address; then
    SAN=address
  else
    echo "   the address sanitizer does not build here (see fuzz/logs/build-address.log); using -s none"
    SAN=none
  fi
fi
if [ ! -f "$LOGS/build-$SAN.log" ] || [ -n "${FUZZ_SANITIZER:-}" ]; then
  echo "== building (sanitizer: $SAN)"
  if ! build "$SAN"; then
    tail -n 40 "$LOGS/build-$SAN.log"
    echo "FAIL: the fuzz targets do not build"
    exit 1
  fi
fi

failed=()
for t in "${TARGETS[@]}"; do
  corpus=$ROOT/fuzz/corpus/$t
  artifacts=$ROOT/fuzz/artifacts/$t
  mkdir -p "$corpus" "$artifacts"
  before=$(find "$artifacts" -type f | wc -l)
  log=$LOGS/$t.log
  echo "== $t: ${SECONDS_PER_TARGET}s (sanitizer: $SAN, log: fuzz/logs/$t.log)"
  set +e
  nice cargo fuzz run "$t" -s "$SAN" -a "$corpus" "$ROOT/fuzz/seeds/$t" -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout="$TIMEOUT" -rss_limit_mb=4096 \
    -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  runs=$(grep -aoE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -aoE '[0-9]+$' | tail -n1 || true)
  [ -n "$runs" ] || runs=$(grep -aoE '^Done [0-9]+ runs' "$log" | grep -aoE '[0-9]+' | tail -n1 || true)
  status=$(grep -aE '^#[0-9]+' "$log" | tail -n1 || true)
  echo "   executions: ${runs:-?}"
  echo "   last status: ${status:-?}"
  echo "   corpus: $(find "$corpus" -type f | wc -l) files"
  after=$(find "$artifacts" -type f | wc -l)
  if [ "$rc" -ne 0 ] || [ "$after" -gt "$before" ]; then
    failed+=("$t")
    echo "   FAIL (exit $rc)"
    grep -aE "panicked at|^thread '|ERROR: libFuzzer|SUMMARY|deadly signal|timeout after" "$log" | head -n 20 | sed 's/^/   | /' || true
    newest=$(ls -t "$artifacts"/* 2>/dev/null | head -n1 || true)
    if [ -n "$newest" ]; then
      echo "   artifact: ${newest#"$ROOT"/}"
      min=$artifacts/minimized-$(basename "$newest")
      set +e
      nice cargo fuzz tmin "$t" -s "$SAN" -a "$newest" -- -max_total_time=60 -exact_artifact_path="$min" \
        >"$LOGS/$t-tmin.log" 2>&1
      set -e
      if [ -f "$min" ]; then
        echo "   minimized: ${min#"$ROOT"/}, $(wc -c <"$min") bytes:"
        od -c "$min" | head -n 8 | sed 's/^/   | /'
        # The panic message of the minimized input.
        set +e
        nice cargo fuzz run "$t" -s "$SAN" -a "$min" >"$LOGS/$t-repro.log" 2>&1
        set -e
        grep -aE "panicked at" -A 2 "$LOGS/$t-repro.log" | head -n 6 | sed 's/^/   | /' || true
      fi
    fi
  else
    echo "   ok: no crash"
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAIL: ${failed[*]}"
  exit 1
fi
echo "ok: ${TARGETS[*]} ran ${SECONDS_PER_TARGET}s each with no crash"
