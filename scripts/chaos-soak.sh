#!/usr/bin/env bash
# The chaos soak (README "Chaos soak"): a real API server with kube-controller-manager, two agents, the writer and Git
# over HTTPS, under a steady workload and a random fault every 5-15 s, for SOAK_MINUTES (default 30); at the end the
# Git tree must equal the cluster. Needs root (network namespaces) and what scripts/install-test-deps.sh installs.
#
#   scripts/chaos-soak.sh                 # 30 minutes
#   SOAK_MINUTES=5 scripts/chaos-soak.sh  # a quick run
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL=0
source scripts/cache-dirs.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REVERSER_CACHE/target/$REVERSER_CHECKOUT}"
./scripts/install-test-deps.sh
cargo build --locked -p reverser-writer --bin reverser-writer
cargo test --locked -p reverser-agent --test partition_e2e -- --ignored --exact chaos_soak --nocapture
