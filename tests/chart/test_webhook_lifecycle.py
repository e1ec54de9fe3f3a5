"""The ValidatingWebhookConfiguration across owners: the chart (`createConfiguration=true`) and the agent
(`createConfiguration=false`, the real `reverser-agent` run with the arguments the chart renders, against the
kube-emulator). Helm (the real engine) must be able to take the configuration back from the agent, hand it over
again, and uninstall must leave nothing that keeps sending writes to a deleted Service.

The kube-emulator has no garbage collector: what the test checks for uninstall is that the agent-applied
configuration is owned (ownerReference, uid included) by the agent's ClusterRole, which Helm deletes, and that an
agent still running once that owner is gone does not re-create the configuration. On a real cluster the collector
deletes a cluster-scoped object whose cluster-scoped owner is gone.
"""

import base64
import json
import socket
import subprocess
import tempfile
import time
import urllib.error
from pathlib import Path

import pytest
import yaml

from conftest import HelmSession, require_binary

VWC = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
PATIENCE = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_or_none(emulator, path: str):
    try:
        return emulator.get(path)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def wait_for(what: str, check, agent=None):
    deadline = time.time() + PATIENCE
    while time.time() < deadline:
        found = check()
        if found:
            return found
        if agent is not None and agent.proc.poll() is not None:
            pytest.fail(f"the agent exited while waiting for {what}: {agent.log()}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}" + (f"; agent log: {agent.log()}" if agent else ""))


class Agent:
    """`reverser-agent` with the argument list the chart rendered, made runnable outside a Pod: files from the
    rendered Secrets, local ports, the emulator's kubeconfig, and no writer (the webhook configuration does not need
    one)."""

    def __init__(self, emulator, manifest: str, fullname: str, workdir: Path):
        docs = [d for d in yaml.safe_load_all(manifest) if d]
        deploy = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"{fullname}-agent")
        secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == f"{fullname}-webhook-tls")
        tls = workdir / "webhook-tls"
        tls.mkdir(exist_ok=True)
        for key, value in secret["data"].items():
            (tls / key).write_bytes(base64.b64decode(value))
        args = []
        for arg in deploy["spec"]["template"]["spec"]["containers"][0]["args"]:
            flag = arg.split("=", 1)[0]
            if flag in ("--writer-ca", "--writer-cert", "--writer-key"):
                continue
            arg = arg.replace("/etc/reverser/webhook-tls", str(tls))
            if flag == "--writer-url":
                arg = f"--writer-url=http://127.0.0.1:{free_port()}"
            elif flag == "--admin-addr":
                arg = f"--admin-addr=127.0.0.1:{free_port()}"
            elif flag == "--webhook-addr":
                arg = f"--webhook-addr=127.0.0.1:{free_port()}"
            elif flag == "--log-level":
                arg = "--log-level=info"
            args.append(arg)
        self.args = args
        self.logfile = open(workdir / f"agent-{time.time_ns()}.log", "w+")
        self.proc = subprocess.Popen(
            [str(require_binary("reverser-agent")), *args, "--kubeconfig", str(emulator.kubeconfig)],
            stdout=self.logfile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        self.logfile.flush()
        return Path(self.logfile.name).read_text()[-6000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.logfile.close()


def test_the_configuration_moves_between_chart_and_agent_and_uninstall_leaves_no_live_owner(emulator):
    namespace = emulator.new_namespace("lifecycle")
    release = "lc"
    fullname = f"{release}-gitops-reverser"
    config_path = f"{VWC}/{fullname}"
    workdir = Path(tempfile.mkdtemp(prefix="webhook-lifecycle-"))
    agent_managed = {"clusterName": "emu", "agent": {"webhook": {"enabled": True, "createConfiguration": False}}}
    chart_managed = {"clusterName": "emu", "agent": {"webhook": {"enabled": True, "createConfiguration": True}}}
    helm = HelmSession(emulator, namespace)
    agent = None
    try:
        installed = helm.run("install", release, agent_managed)
        assert installed["ok"], installed.get("error")
        assert get_or_none(emulator, config_path) is None, "the chart does not create it in this mode"

        # 1. The agent registers the configuration, with Helm's ownership metadata and its ClusterRole as owner.
        agent = Agent(emulator, installed["manifest"], fullname, workdir)
        applied = wait_for("the agent's configuration", lambda: get_or_none(emulator, config_path), agent)
        meta = applied["metadata"]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert meta["annotations"]["meta.helm.sh/release-name"] == release
        assert meta["annotations"]["meta.helm.sh/release-namespace"] == namespace
        role = emulator.get(f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{fullname}-agent")
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "name": f"{fullname}-agent",
                "uid": role["metadata"]["uid"],
            }
        ]
        service = applied["webhooks"][0]["clientConfig"]["service"]
        assert (service["namespace"], service["name"]) == (namespace, f"{fullname}-webhook")
        agent.stop()
        agent = None

        # 2. Back to the chart: Helm adopts the agent's configuration instead of refusing to import it.
        upgraded = helm.run("upgrade", release, chart_managed)
        assert upgraded["ok"], upgraded.get("error")
        adopted = emulator.get(config_path)
        assert adopted["webhooks"][0]["rules"][0]["resources"] == ["*"], "the chart's broad rules"
        assert adopted["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"

        # 3. And to the agent again: Helm removes its configuration, the agent registers its own.
        upgraded = helm.run("upgrade", release, agent_managed)
        assert upgraded["ok"], upgraded.get("error")
        assert get_or_none(emulator, config_path) is None
        agent = Agent(emulator, upgraded["manifest"], fullname, workdir)
        reapplied = wait_for("the agent's configuration again", lambda: get_or_none(emulator, config_path), agent)
        owner_uid = reapplied["metadata"]["ownerReferences"][0]["uid"]
        assert owner_uid == role["metadata"]["uid"]

        # 4. Uninstall: Helm deletes the owner; the garbage collector deletes what it owns (not emulated: done here by
        # hand, as the collector would). An agent still running then must not bring the configuration back.
        uninstalled = helm.run("uninstall", release)
        assert uninstalled["ok"], uninstalled.get("error")
        assert get_or_none(emulator, f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{fullname}-agent") is None
        assert emulator.get(config_path)["metadata"]["ownerReferences"][0]["uid"] == owner_uid
        emulator.request("DELETE", config_path)
        wait_for("the agent to notice its owner is gone", lambda: "owner ClusterRole does not exist" in agent.log(), agent)
        assert get_or_none(emulator, config_path) is None, "the agent re-created an uninstalled configuration"
    finally:
        if agent is not None:
            agent.stop()
        helm.close()
        if get_or_none(emulator, config_path) is not None:
            emulator.request("DELETE", config_path)


def test_an_agent_configuration_deleted_behind_its_back_is_applied_again(emulator):
    """The `helm upgrade` to createConfiguration=false deletes the chart's configuration; if the new agent applied
    its own first, the deletion takes it away: the leader notices and applies it again."""
    namespace = emulator.new_namespace("reapply")
    release = "ra"
    fullname = f"{release}-gitops-reverser"
    config_path = f"{VWC}/{fullname}"
    workdir = Path(tempfile.mkdtemp(prefix="webhook-reapply-"))
    helm = HelmSession(emulator, namespace)
    agent = None
    try:
        installed = helm.run(
            "install", release, {"agent": {"webhook": {"enabled": True, "createConfiguration": False}}}
        )
        assert installed["ok"], installed.get("error")
        agent = Agent(emulator, installed["manifest"], fullname, workdir)
        first = wait_for("the agent's configuration", lambda: get_or_none(emulator, config_path), agent)
        emulator.request("DELETE", config_path)
        again = wait_for("the configuration re-applied", lambda: get_or_none(emulator, config_path), agent)
        assert again["metadata"]["uid"] != first["metadata"]["uid"]
    finally:
        if agent is not None:
            agent.stop()
        helm.close()
        if get_or_none(emulator, config_path) is not None:
            emulator.request("DELETE", config_path)
