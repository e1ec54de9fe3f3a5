#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then format check, clippy and every
# test of the workspace (one shared debug build).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export CARGO_INCREMENTAL=0
# One build cache per checkout, outside git (a re-run only rebuilds what changed). Not shared between checkouts:
# cargo judges a workspace crate up to date by file times, not contents, so a cache shared by two checkouts would
# test whichever checkout's code was compiled last.
source scripts/cache-dirs.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REVERSER_CACHE/target/$REVERSER_CHECKOUT}"
echo "== build cache: $CARGO_TARGET_DIR"
# A cold run writes ~9 GiB of Rust build caches here (tests, fuzz, fuzz clippy; measured in a fresh clone), and on a
# fresh machine the Go build of the control plane a few GiB more into Go's own caches. A full disk shows up much later
# as a linker crash (SIGBUS), so warn up front.
mkdir -p "$REVERSER_CACHE"
free_gib=$(df -Pk "$REVERSER_CACHE" | awk 'NR == 2 { print int($4 / 1048576) }')
if [ "${free_gib:-0}" -lt 15 ]; then
  echo "warning: ${free_gib:-?} GiB free under $REVERSER_CACHE; a run on a cold cache needs about 15 GiB" \
    "(the caches of checkouts that are gone can be deleted: $REVERSER_CACHE/{target,fuzz-target,fuzz-clippy-target}/<checkout>)" >&2
fi
REVERSER_REAL_KUBE=background ./scripts/install-test-deps.sh
# The real control plane (a Go build of several minutes on a cold cache) builds beside the Rust builds below, which
# leave a core idle much of the time; its lines are prefixed with [real-kube]. The tests wait for it.
setsid bash -c './scripts/build-real-kube.sh 2>&1 | sed -u "s/^/[real-kube] /"; exit "${PIPESTATUS[0]}"' &
real_kube=$!
trap 'kill -- -"$real_kube" 2>/dev/null || true' EXIT
echo "== self-contained: nothing reads outside the repository"
# A fresh clone may sit anywhere: tests and scripts must not reach for ../shared (fixtures live in tests/fixtures).
if git grep -nE '\.\./(\.\./)*shared(/|\b)' -- '*.rs' '*.py' '*.sh' ':!scripts/test.sh'; then
  echo "these files read ../shared at run time; copy what they need into tests/fixtures" >&2
  exit 1
fi
echo "== import circles between the modules of each agent crate (ARCHITECTURE.md)"
python3 scripts/module-circles.py
echo "== cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The fuzz targets are a workspace of their own (see fuzz/Cargo.toml); their lint build gets its own cache too.
CARGO_TARGET_DIR="$REVERSER_CACHE/fuzz-clippy-target/$REVERSER_CHECKOUT" \
  cargo clippy --manifest-path fuzz/Cargo.toml --all-targets --locked -- -D warnings
echo "== tests"
cargo nextest run --workspace --locked --no-run
echo "== waiting for the real control plane build"
wait "$real_kube" || { echo "building the real control plane failed (see the [real-kube] lines)" >&2; exit 1; }
trap - EXIT
cargo nextest run --workspace --locked --no-fail-fast
echo "== fuzz targets (fuzz/, ${FUZZ_SECONDS:-20}s each, own instrumented build cached next to the main one)"
./scripts/fuzz.sh
echo "== chart tests (tests/chart: helm lint/install against the kube-emulator, docker-compose config)"
cargo build --workspace --bins --locked -q
.tools/chart-venv/bin/python -m pytest -q tests/chart
