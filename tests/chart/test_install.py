"""`helm install` and `helm upgrade` (the real Helm engine, wait=False) against the kube-emulator, read back with
the real kubectl."""

import json

import pytest
import yaml

from conftest import CHART, run_helm


@pytest.fixture(scope="module")
def installed(emulator):
    """One release installed, then upgraded twice: unchanged, and with the webhook turned on."""
    namespace = emulator.new_namespace("install")
    release = "gr"
    results = run_helm(
        emulator,
        namespace,
        [
            {"op": "install", "release": release, "chart": str(CHART), "values": {"clusterName": "emu"}},
            {"op": "upgrade", "release": release, "chart": str(CHART), "values": {"clusterName": "emu"}},
            {
                "op": "upgrade",
                "release": release,
                "chart": str(CHART),
                "values": {"clusterName": "emu", "agent": {"webhook": {"enabled": True}}},
            },
        ],
    )
    for result in results:
        assert result["ok"], result.get("error")
    yield namespace, release, results
    emulator.request(
        "DELETE", "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/gr-gitops-reverser"
    )


def kubectl_json(emulator, *args):
    return json.loads(emulator.kubectl(*args, "-o", "json"))


def manifest_secrets(manifest: str) -> dict:
    return {
        d["metadata"]["name"]: d["data"]
        for d in yaml.safe_load_all(manifest)
        if d and d["kind"] == "Secret"
    }


def test_crds_are_installed_and_established(installed, emulator):
    for name in ("watchrules", "clusterwatchrules", "gitrepoconfigs", "gitdestinations"):
        crd = kubectl_json(emulator, "get", "crd", f"{name}.configbutler.ai")
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True", crd["status"]
    # The custom resources are served: kubectl can list them.
    assert kubectl_json(emulator, "get", "watchrules", "-A")["items"] == []


def test_helm_created_what_the_chart_renders(installed, emulator):
    namespace, release, _ = installed
    deployments = kubectl_json(emulator, "-n", namespace, "get", "deployments")["items"]
    by_name = {d["metadata"]["name"]: d for d in deployments}
    assert set(by_name) == {"gr-gitops-reverser-agent", "gr-gitops-reverser-writer"}
    agent = by_name["gr-gitops-reverser-agent"]
    assert agent["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert agent["metadata"]["annotations"]["meta.helm.sh/release-name"] == release
    args = agent["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--cluster-name=emu" in args and "--leader-election=true" in args
    writer = by_name["gr-gitops-reverser-writer"]
    assert writer["spec"]["strategy"]["type"] == "Recreate"

    services = {s["metadata"]["name"] for s in kubectl_json(emulator, "-n", namespace, "get", "services")["items"]}
    assert {"gr-gitops-reverser-writer", "gr-gitops-reverser-writer-metrics", "gr-gitops-reverser-agent-metrics"} <= services
    role = kubectl_json(emulator, "get", "clusterrole", "gr-gitops-reverser-agent")
    assert any("watchrules/status" in rule["resources"] for rule in role["rules"])
    for kind in ("role", "rolebinding"):
        names = {o["metadata"]["name"] for o in kubectl_json(emulator, "-n", namespace, "get", kind)["items"]}
        assert {"gr-gitops-reverser-agent", "gr-gitops-reverser-writer"} <= names
    assert kubectl_json(emulator, "-n", namespace, "get", "pdb", "gr-gitops-reverser-agent")["spec"]["minAvailable"] == 1
    accounts = {o["metadata"]["name"] for o in kubectl_json(emulator, "-n", namespace, "get", "serviceaccounts")["items"]}
    assert {"gr-gitops-reverser-agent", "gr-gitops-reverser-writer"} <= accounts


def test_upgrades_keep_the_generated_certificates(installed, emulator):
    namespace, _, (install, same, webhook) = installed
    first = manifest_secrets(install["manifest"])
    second = manifest_secrets(same["manifest"])
    third = manifest_secrets(webhook["manifest"])
    for name in ("gr-gitops-reverser-ca", "gr-gitops-reverser-writer-tls", "gr-gitops-reverser-agent-tls"):
        assert first[name] == second[name] == third[name], f"{name} changed on upgrade"
    # A certificate added later is signed by the kept CA.
    assert third["gr-gitops-reverser-webhook-tls"]["ca.crt"] == first["gr-gitops-reverser-ca"]["tls.crt"]
    live = {
        s["metadata"]["name"]: s["data"]
        for s in kubectl_json(emulator, "-n", namespace, "get", "secrets")["items"]
    }
    for name, data in third.items():
        assert live[name] == data
    config = kubectl_json(emulator, "get", "validatingwebhookconfiguration", "gr-gitops-reverser")
    assert config["webhooks"][0]["clientConfig"]["caBundle"] == first["gr-gitops-reverser-ca"]["tls.crt"]
    assert config["webhooks"][0]["failurePolicy"] == "Ignore"


def test_notes_explain_the_install(installed):
    _, _, (install, *_rest) = installed
    assert "https://gr-gitops-reverser-writer." in install["notes"]
    assert "configbutler.ai/leader=true" in install["notes"]
