"""Webhook hardening values (client certificates, NetworkPolicy) and the environment the chart gives each binary."""

import re
import subprocess

import pytest

from conftest import ROOT, require_binary

HELP_ENV = re.compile(r"\[env: ([A-Z][A-Z0-9_]*)=")
SOURCE_ENV = re.compile(r'env::var\("([A-Z][A-Z0-9_]*)"\)')
CRATE = {"agent": "agent", "writer": "writer"}


def env_names_read_by(component: str) -> set[str]:
    """Every environment variable the binary reads: its flags' env names (from its own --help) and the names its
    source reads directly (the downward-API variables)."""
    help_text = subprocess.run(
        [str(require_binary(f"reverser-{component}")), "--help"], capture_output=True, text=True, check=True
    ).stdout
    names = set(HELP_ENV.findall(help_text))
    for source in (ROOT / CRATE[component] / "src").rglob("*.rs"):
        names |= set(SOURCE_ENV.findall(source.read_text()))
    return names


RICH = {
    "agent": {
        "webhook": {
            "enabled": True,
            "createConfiguration": False,
            "clientAuth": {"existingSecret": "apiserver-client-ca", "allowedNames": ["kube-apiserver"]},
            "networkPolicy": {"enabled": True, "from": [{"ipBlock": {"cidr": "10.0.0.10/32"}}]},
        }
    }
}


@pytest.mark.parametrize("values", [{}, RICH], ids=["defaults", "webhook-options"])
@pytest.mark.parametrize("component", ["agent", "writer"])
def test_every_variable_the_chart_sets_is_read_by_the_binary(render, values, component):
    env = render(values).container(component).get("env", [])
    names = {e["name"] for e in env}
    assert names, "the chart sets at least POD_NAME"
    unread = names - env_names_read_by(component)
    assert unread == set(), f"reverser-{component} never reads {sorted(unread)}"


def test_the_writer_gets_only_its_pod_name(render):
    assert [e["name"] for e in render().container("writer")["env"]] == ["POD_NAME"]
    assert {e["name"] for e in render().container("agent")["env"]} == {"POD_NAME", "POD_NAMESPACE"}


def test_client_certificates_are_off_by_default(render):
    r = render()
    assert not r.flag("agent", "--webhook-client-ca")
    assert not r.flag("agent", "--webhook-client-names")
    assert not r.all("NetworkPolicy")


def test_a_client_ca_secret_requires_the_api_servers_certificate(render):
    r = render(RICH)
    assert r.flag("agent", "--webhook-client-ca") == ["/etc/reverser/webhook-client-ca/ca.crt"]
    assert r.flag("agent", "--webhook-client-names") == ["kube-apiserver"]
    container = r.container("agent")
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["webhook-client-ca"]["mountPath"] == "/etc/reverser/webhook-client-ca"
    volumes = {v["name"]: v for v in r.deployment("agent")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["webhook-client-ca"]["secret"]["secretName"] == "apiserver-client-ca"
    custom = render(
        {"agent": {"webhook": {"clientAuth": {"existingSecret": "ca", "key": "bundle.pem", "allowedNames": ["a", "b"]}}}}
    )
    assert custom.flag("agent", "--webhook-client-ca") == ["/etc/reverser/webhook-client-ca/bundle.pem"]
    assert custom.flag("agent", "--webhook-client-names") == ["a,b"]
    # The agent binary accepts what the chart renders.
    out = subprocess.run(
        [str(require_binary("reverser-agent")), *custom.args("agent"), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_the_network_policy_admits_the_webhook_only_from_the_listed_peers(render):
    r = render(RICH)
    [policy] = r.all("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "agent"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    webhook, admin = policy["spec"]["ingress"]
    assert webhook["ports"] == [{"port": 9444, "protocol": "TCP"}]
    assert webhook["from"] == [{"ipBlock": {"cidr": "10.0.0.10/32"}}]
    # Metrics and probes stay reachable (from anywhere unless adminFrom narrows it).
    assert admin["ports"] == [{"port": 8082, "protocol": "TCP"}]
    assert "from" not in admin
    narrowed = render(
        {
            "agent": {
                "webhook": {
                    "networkPolicy": {
                        "enabled": True,
                        "from": [{"ipBlock": {"cidr": "172.16.0.2/32"}}],
                        "adminFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
                    }
                }
            }
        }
    )
    [policy] = narrowed.all("NetworkPolicy")
    assert policy["spec"]["ingress"][1]["from"] == [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]


def test_a_network_policy_without_peers_is_refused(render):
    error = render({"agent": {"webhook": {"networkPolicy": {"enabled": True}}}}, expect_error=True)
    assert "agent.webhook.networkPolicy.from" in error


@pytest.mark.parametrize("watch_all", [False, True])
def test_the_agent_may_read_the_cluster_role_that_owns_its_configuration(render, watch_all):
    """--webhook-configuration-owner needs the ClusterRole's uid: the agent's own ClusterRole must allow `get` on it."""
    r = render(
        {"agent": {"discovery": {"watchAll": watch_all}, "webhook": {"enabled": True, "createConfiguration": False}}}
    )
    [owner] = r.flag("agent", "--webhook-configuration-owner")
    role = r.get("ClusterRole", f"{r.fullname}-agent")
    assert owner == role["metadata"]["name"]
    assert any(
        set(rule.get("apiGroups", [])) & {"rbac.authorization.k8s.io", "*"}
        and set(rule.get("resources", [])) & {"clusterroles", "*"}
        and set(rule["verbs"]) & {"get", "*"}
        and owner in rule.get("resourceNames", [owner])
        for rule in role["rules"]
    ), role["rules"]
