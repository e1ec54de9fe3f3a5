"""Shared fixtures for the chart tests: tools (which must exist: a missing tool fails, never skips), the
kube-emulator, and Helm renders through the real Helm engine (helm-sdkpy).

helm-sdkpy has no `helm template`: a render is an `Install(wait=False)` into a fresh namespace of the emulator, and
its release manifest is what `helm template` would print (with `lookup` answered by a real API).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "gitops-reverser"
RUNNER = Path(__file__).with_name("helm_runner.py")
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"


def require_tool(name: str) -> str:
    """Path of a command-line tool; fails the test (loudly) when it is missing."""
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: run scripts/install-test-deps.sh", pytrace=False)
    return found


def require_binary(name: str) -> Path:
    path = TARGET / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `cargo build --workspace --bins` first", pytrace=False)
    return path


def default_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class Emulator:
    """A `kube-emulator` process with the kubeconfig it wrote."""

    def __init__(self, workdir: Path):
        binary = TARGET / "kube-emulator"
        if not binary.is_file():
            subprocess.run(
                ["cargo", "build", "-q", "-p", "kube-emulator"], cwd=ROOT, check=True
            )
        self.kubeconfig = workdir / "kubeconfig.yaml"
        self.log = open(workdir / "emulator.log", "w+")
        self.proc = subprocess.Popen(
            [str(binary), "--addr", "127.0.0.1:0", "--kubeconfig-out", str(self.kubeconfig)],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        line = self.proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"kube-emulator did not start: {line!r}")
        self.url = match.group(1)
        deadline = time.time() + 10
        while not self.kubeconfig.exists() and time.time() < deadline:
            time.sleep(0.05)
        self._ns = itertools.count(1)
        for crd in yaml.safe_load_all((Path(__file__).parent / "fixtures" / "third-party-crds.yaml").read_text()):
            self.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def get(self, path: str) -> dict:
        return self.request("GET", path)

    def new_namespace(self, prefix: str = "chart") -> str:
        name = f"{prefix}-{next(self._ns)}"
        self.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        )
        return name

    def kubectl(self, *args: str) -> str:
        kubectl = require_tool("kubectl")
        out = subprocess.run(
            [kubectl, "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {out.stderr}")
        return out.stdout

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def run_helm(emulator: Emulator, namespace: str, ops: list[dict]) -> list[dict]:
    """Runs Helm actions in a child process with HELM_DRIVER=memory (see helm_runner.py)."""
    job = {"kubeconfig": str(emulator.kubeconfig), "namespace": namespace, "ops": ops}
    env = dict(os.environ, HELM_DRIVER="memory")
    out = subprocess.run(
        [sys.executable, str(RUNNER)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if out.returncode != 0:
        raise AssertionError(f"helm runner failed ({out.returncode}): {out.stderr[-4000:]}")
    return json.loads(out.stdout)


class HelmSession:
    """Helm actions on one release, one at a time, with the cluster free to change in between (helm_runner.py
    --interactive; the release lives in that child's memory)."""

    def __init__(self, emulator: Emulator, namespace: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNNER), "--interactive"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, HELM_DRIVER="memory"),
        )
        self._send({"kubeconfig": str(emulator.kubeconfig), "namespace": namespace})

    def _send(self, message: dict) -> None:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def run(self, op: str, release: str, values: dict | None = None) -> dict:
        self._send({"op": op, "release": release, "chart": str(CHART), "values": values or {}})
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"helm runner died: {self.proc.stderr.read()[-4000:]}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Rendered:
    """The objects of one release manifest."""

    def __init__(self, manifest: str, notes: str, namespace: str, release: str):
        self.manifest = manifest
        self.notes = notes
        self.namespace = namespace
        self.release = release
        self.objects = [d for d in yaml.safe_load_all(manifest) if d]

    def all(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        for o in self.all(kind):
            if o["metadata"]["name"] == name:
                return o
        names = [f"{o['kind']}/{o['metadata']['name']}" for o in self.objects]
        raise AssertionError(f"no {kind}/{name} in the manifest; have {names}")

    def has(self, kind: str, name: str) -> bool:
        return any(o["metadata"]["name"] == name for o in self.all(kind))

    def deployment(self, component: str) -> dict:
        return self.get("Deployment", f"{self.fullname}-{component}")

    def container(self, component: str) -> dict:
        return self.deployment(component)["spec"]["template"]["spec"]["containers"][0]

    def args(self, component: str) -> list[str]:
        return self.container(component)["args"]

    def flag(self, component: str, flag: str) -> list[str]:
        """Values of `--flag=value` arguments (a bare `--flag` gives "")."""
        out = []
        for arg in self.args(component):
            if arg == flag:
                out.append("")
            elif arg.startswith(flag + "="):
                out.append(arg[len(flag) + 1 :])
        return out

    @property
    def fullname(self) -> str:
        return f"{self.release}-gitops-reverser"


@pytest.fixture(scope="session")
def emulator():
    workdir = Path(tempfile.mkdtemp(prefix="chart-emu-"))
    emu = Emulator(workdir)
    yield emu
    emu.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def render(emulator):
    """render(values) -> Rendered: a fresh install (cached per values) into a new namespace of the emulator."""
    cache: dict[str, Rendered] = {}

    def _render(values: dict | None = None, expect_error: bool = False):
        key = json.dumps(values or {}, sort_keys=True) + str(expect_error)
        if key in cache:
            return cache[key]
        namespace = emulator.new_namespace("render")
        release = "r" + namespace.rsplit("-", 1)[1]
        [result] = run_helm(
            emulator,
            namespace,
            [{"op": "install", "release": release, "chart": str(CHART), "values": values or {}}],
        )
        if expect_error:
            assert not result["ok"], f"install with {values} should have failed"
            cache[key] = result["error"]
            return result["error"]
        assert result["ok"], f"install failed: {result.get('error')}"
        rendered = Rendered(result["manifest"], result["notes"], namespace, release)
        cache[key] = rendered
        return rendered

    return _render


HELP_FLAG = re.compile(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)", re.MULTILINE)


def binary_flags(component: str) -> set[str]:
    """The long flags `reverser-{component} --help` lists (help and version aside)."""
    out = subprocess.run(
        [str(require_binary(f"reverser-{component}")), "--help"], capture_output=True, text=True, check=True
    ).stdout
    return set(HELP_FLAG.findall(out)) - {"--help", "--version"}


def declared_webhook_flags() -> set[str]:
    """Flags the agent's webhook module declares (`WebhookArgs` in agent/src/webhook/mod.rs), whether or not the
    agent binary flattens them in yet."""
    source = (ROOT / "agent" / "src" / "webhook" / "mod.rs").read_text()
    fields = re.findall(r"^\s*#\[arg\(long\b.*\)\]\s*$\s*pub (\w+):", source, re.MULTILINE)
    return {"--" + f.replace("_", "-") for f in fields}
