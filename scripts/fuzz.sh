#!/usr/bin/env bash
# Runs every libFuzzer target of fuzz/ for a bounded time: one shared instrumented build (its own target dir,
# cached under ~/.cache/gitops-reverser/fuzz-target/<checkout>), the repository's seeds (fuzz/seeds/<target>, read only) plus
# a cached working corpus, and a failure on the first crash (the input is kept; the command to replay it is
# printed). Stable toolchain: coverage instrumentation without a sanitizer (`--sanitizer none`).
#
#   scripts/fuzz.sh                     # every target, FUZZ_SECONDS (default 20) each
#   FUZZ_SECONDS=600 scripts/fuzz.sh session paths
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL=0
SECONDS_PER_TARGET="${FUZZ_SECONDS:-20}"
source scripts/cache-dirs.sh
CACHE="$REVERSER_CACHE"
# The main build's CARGO_TARGET_DIR must not be shared: instrumented artifacts would evict it. One instrumented
# build per checkout, for the reason scripts/test.sh gives.
unset CARGO_TARGET_DIR
FUZZ_TARGET_DIR="$CACHE/fuzz-target/$REVERSER_CHECKOUT"
BUILD=(--sanitizer none --release --debug-assertions --target-dir "$FUZZ_TARGET_DIR")
command -v cargo-fuzz >/dev/null 2>&1 || { echo "cargo-fuzz is missing: run scripts/install-test-deps.sh" >&2; exit 1; }

if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi
echo "== fuzz: building ${#targets[@]} targets once (instrumented, cached in $FUZZ_TARGET_DIR)"
cargo fuzz build "${BUILD[@]}"
failed=()
for target in "${targets[@]}"; do
  corpus="$CACHE/fuzz-corpus/$target"
  artifacts="$CACHE/fuzz-artifacts/$target"
  log="$CACHE/fuzz-logs/$target.log"
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  echo "== fuzz $target: ${SECONDS_PER_TARGET}s (corpus $corpus + fuzz/seeds/$target)"
  dict=()
  case "$target" in yaml_validate|canonical_render|sops_round_trip|yaml_edit) dict=(-dict=fuzz/dicts/yaml.dict) ;; esac
  # libFuzzer writes new inputs to the first corpus directory only; the seeds stay untouched.
  if cargo fuzz run "${BUILD[@]}" "$target" "$corpus" "fuzz/seeds/$target" -- "${dict[@]}" \
      -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$artifacts/" >"$log" 2>&1; then
    grep -E '^#[0-9]+\s+(INITED|DONE|pulse)|^stat::number_of_executed_units|^stat::peak_rss_mb' "$log" | tail -n 4
  else
    grep -E '^#[0-9]+\s+(INITED|pulse)' "$log" | tail -n 2 || true
    echo "---- $target failed; end of $log:"
    tail -n 60 "$log"
    crash=$(grep -oE "$artifacts/[a-z-]+-[0-9a-f]+" "$log" | tail -n 1 || true)
    [ -n "$crash" ] && echo "replay: cargo fuzz run ${BUILD[*]} $target $crash"
    failed+=("$target")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ok"
