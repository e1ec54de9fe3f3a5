#!/usr/bin/env bash
# Builds the real Kubernetes control plane the tests run against, from Go modules (tests/real-kube/*/go.mod):
# kube-apiserver, kube-controller-manager and kubectl v1.37.2, etcd v3.6.16 and the helm v4.3.2 CLI.
#
# The binaries are cached outside git, in ${XDG_CACHE_HOME:-~/.cache}/gitops-reverser/real-kube-<hash>, keyed by
# the wrapper modules (go.mod + go.sum) and this script, so a second run costs nothing. .tools/real-kube points at
# the cache; the tests find the binaries there (or at $REVERSER_REAL_KUBE_BIN).
# A cold build takes a long time on 2 cores (see README, "Real Kubernetes in the tests").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export PATH="/usr/local/go/bin:$PATH"
command -v go >/dev/null 2>&1 || { echo "build-real-kube: no Go toolchain (expected at /usr/local/go/bin)" >&2; exit 1; }

K8S_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
HELM_VERSION=v4.3.2

key=$(cat tests/real-kube/*/go.mod tests/real-kube/*/go.sum scripts/build-real-kube.sh | sha256sum | cut -c1-16)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/gitops-reverser/real-kube-$key"
BIN="$CACHE/bin"
mkdir -p "$ROOT/.tools"
link() { ln -sfn "$CACHE" "$ROOT/.tools/real-kube"; }

if [ -f "$CACHE/complete" ]; then
  link
  echo "build-real-kube: cached ($CACHE)"
  exit 0
fi
mkdir -p "$BIN"
go version

step() { # name, dir, then go build arguments
  local name=$1 dir=$2; shift 2
  echo "build-real-kube: building $name (cold: minutes; progress below is Go's own)"
  local start=$SECONDS
  (cd "tests/real-kube/$dir" && CGO_ENABLED=0 /usr/bin/time -f "%e s wall, %M KiB peak RSS" go build -trimpath "$@")
  echo "build-real-kube: $name done in $((SECONDS - start)) s"
}

# hack/lib/version.sh sets these keys, so /version (and Helm's kubeVersion checks) see v1.37.2.
ld="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=37 -X $p.gitTreeState=clean"
  ld="$ld -X $p.gitCommit=0000000000000000000000000000000000000000 -X $p.buildDate=1970-01-01T00:00:00Z"
done
step "kube-apiserver, kube-controller-manager, kubectl $K8S_VERSION" kube -ldflags "$ld" -o "$BIN/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl
step "etcd $ETCD_VERSION" etcd -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" \
  -o "$BIN/etcd" go.etcd.io/etcd/server/v3
step "helm $HELM_VERSION" helm -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
  -o "$BIN/helm" helm.sh/helm/v4/cmd/helm

"$BIN/kube-apiserver" --version
"$BIN/etcd" --version | sed -n 1p  # sed reads it all: head could end the pipe early, and pipefail would take etcd's SIGPIPE for a failure
"$BIN/helm" version --short
touch "$CACHE/complete"
link
echo "build-real-kube: ok ($CACHE)"
