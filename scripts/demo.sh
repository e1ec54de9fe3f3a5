#!/usr/bin/env bash
# One-command demo with the real binaries: kube-emulator (API server double, loaded with
# scripts/demo/cluster + the configbutler CRDs and configuration), reverser-writer (pushing to a
# local bare repository) and reverser-agent. Then kubectl changes, scales and deletes objects and
# the resulting Git history is printed.
#
#   ./scripts/demo.sh            # builds first (cargo build), keeps nothing afterwards
#   KEEP=1 ./scripts/demo.sh     # keep the temp dir (repo, logs) for inspection
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
for tool in cargo cmake git kubectl; do  # cmake: builds zlib-ng for libgit2 (Cargo.toml)
  command -v "$tool" >/dev/null || { echo "demo: $tool is required" >&2; exit 1; }
done

echo "==> building kube-emulator, reverser-writer, reverser-agent"
cargo build --quiet -p kube-emulator -p reverser-writer -p reverser-agent \
  --bin kube-emulator --bin reverser-writer --bin reverser-agent
target="${CARGO_TARGET_DIR:-$root/target}/debug"

work="$(mktemp -d -t reverser-demo.XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ "${KEEP:-}" == 1 ]]; then echo "demo: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to $2 seconds (default 60) for the command in $1 to succeed.
wait_for() {
  local what="$1" limit="${2:-60}" i=0
  until eval "$what" >/dev/null 2>&1; do
    i=$((i + 1))
    if (( i > limit * 5 )); then echo "demo: timed out waiting for: $what" >&2; tail -n 30 "$work"/*.log >&2; exit 1; fi
    sleep 0.2
  done
}

repo="$work/repo.git"
git init --bare --quiet --initial-branch=main "$repo"
show() { git --git-dir "$repo" show "main:clusters/demo/$1"; }

# The emulator loads CRDs first, then namespaces, then the rest.
mkdir -p "$work/load"
cp crds/*.yaml scripts/demo/cluster/*.yaml "$work/load/"
sed "s|@REPO_URL@|file://$repo|" scripts/demo/config.yaml.in >"$work/load/90-config.yaml"

echo "==> starting kube-emulator"
"$target/kube-emulator" --addr 127.0.0.1:0 --load "$work/load" --kubeconfig-out "$work/kubeconfig" \
  >"$work/emulator.log" 2>&1 &
pids+=($!)
wait_for "test -s '$work/kubeconfig'"
export KUBECONFIG="$work/kubeconfig"
k() { kubectl "$@"; }

grpc_port="$(free_port)"
echo "==> starting reverser-writer on 127.0.0.1:$grpc_port"
"$target/reverser-writer" --grpc-addr "127.0.0.1:$grpc_port" --admin-addr "127.0.0.1:$(free_port)" \
  --work-dir "$work/writer" --leases off --git-batch-max-wait-sec 1 >"$work/writer.log" 2>&1 &
pids+=($!)

agent_admin="127.0.0.1:$(free_port)"
echo "==> starting reverser-agent (admin on $agent_admin)"
"$target/reverser-agent" --writer-url "http://127.0.0.1:$grpc_port" --kubeconfig "$work/kubeconfig" \
  --cluster-name demo --controller-namespace gitops-reverser --admin-addr "$agent_admin" \
  >"$work/agent.log" 2>&1 &
pids+=($!)

echo "==> waiting for the first snapshot to land"
wait_for "show apps/v1/deployments/shop/web.yaml"
wait_for "show demo.example.com/v1/widgets/billing/sprocket.yaml"
wait_for "show rbac.authorization.k8s.io/v1/clusterroles/config-reader.yaml"

echo "==> kubectl: scale web to 5, recolour web-config, delete legacy, add a Widget"
k -n shop patch deployment web --type merge -p '{"spec":{"replicas":5}}'
k -n shop patch configmap web-config --type merge -p '{"data":{"color":"green"}}'
k -n shop delete configmap legacy
k apply -f - <<'YAML'
apiVersion: demo.example.com/v1
kind: Widget
metadata: {name: doohickey, namespace: shop}
spec: {size: 7, color: purple}
YAML
wait_for "show apps/v1/deployments/shop/web.yaml | grep -q 'replicas: 5'"
wait_for "show core/v1/configmaps/shop/web-config.yaml | grep -q 'color: green'"
wait_for "! show core/v1/configmaps/shop/legacy.yaml"
wait_for "show demo.example.com/v1/widgets/shop/doohickey.yaml"
wait_for "show core/v1/secrets/billing/db-password.sops.yaml"

echo
echo "==> status of the agent's custom resources"
cols='KIND:.kind,NAMESPACE:.metadata.namespace,NAME:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,REASON:.status.conditions[?(@.type=="Ready")].reason'
k get gitdestinations,watchrules -A -o custom-columns="$cols"
k get clusterwatchrules -o custom-columns="$cols"
echo
echo "==> git log --stat"
git --git-dir "$repo" log --stat --format='%n%C(yellow)%h%Creset %s%n  author: %an <%ae>' main
echo
echo "==> tree of main"
git --git-dir "$repo" ls-tree -r --name-only main
echo
if git --git-dir "$repo" ls-tree -r --name-only main | grep -E '/(pods|events)/|kube-root-ca|/secrets/.*[^s]\.yaml$|/secrets/.*[^.]sops\.yaml$'; then
  echo "demo: FAILED: runtime state or a plaintext Secret was mirrored" >&2
  exit 1
fi
echo "==> the Secret, as it is in Git (SOPS + age; the plaintext 'hunter2' is in no blob of the history)"
show core/v1/secrets/billing/db-password.sops.yaml | sed -n '1,/^sops:/p'
echo "  ..."
for blob in $(git --git-dir "$repo" rev-list --objects --all | awk '{print $1}'); do
  if git --git-dir "$repo" cat-file -p "$blob" 2>/dev/null | grep -qE 'hunter2|aHVudGVyMg'; then
    echo "demo: FAILED: the Secret's plaintext is in the repository" >&2
    exit 1
  fi
done
echo
echo "==> agent metrics (excerpt)"
python3 - "$agent_admin" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics").read().decode()
for line in text.splitlines():
    if line.startswith("gitops_reverser_agent_") and not line.startswith("#"):
        print("  " + line)
PY
echo "demo: OK"
