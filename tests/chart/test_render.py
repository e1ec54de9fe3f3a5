"""What the chart renders, object by object (a render is a real Helm install into the kube-emulator)."""

import base64
import subprocess
import tempfile
from pathlib import Path

from conftest import require_tool

LEADER = {"configbutler.ai/leader": "true"}


def volumes_by_name(deploy: dict) -> dict:
    return {v["name"]: v for v in deploy["spec"]["template"]["spec"].get("volumes", [])}


def mounts_by_name(container: dict) -> dict:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


def rules_of(role: dict) -> list[tuple[str, str, tuple]]:
    """(group, resource, verbs) for every group × resource of a Role's rules."""
    out = []
    for rule in role["rules"]:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                out.append((group, resource, tuple(sorted(rule["verbs"]))))
    return out


def verbs_for(role: dict, group: str, resource: str) -> set[str]:
    verbs: set[str] = set()
    for g, r, v in rules_of(role):
        if g == group and r == resource:
            verbs |= set(v)
    return verbs


def test_default_install_has_agent_and_writer_deployments(render):
    r = render()
    assert sorted(d["metadata"]["name"] for d in r.all("Deployment")) == [
        f"{r.fullname}-agent",
        f"{r.fullname}-writer",
    ]
    agent = r.deployment("agent")
    assert agent["spec"]["replicas"] == 2
    writer = r.deployment("writer")
    assert writer["spec"]["replicas"] == 1
    assert writer["spec"]["strategy"] == {"type": "Recreate"}


def test_agent_is_leader_elected_spread_and_hardened(render):
    r = render()
    assert r.flag("agent", "--leader-election") == ["true"]
    assert r.flag("agent", "--leader-election-namespace") == [r.namespace]
    assert r.flag("agent", "--controller-namespace") == [r.namespace]
    assert r.flag("agent", "--controller-name") == [r.fullname]
    spec = r.deployment("agent")["spec"]["template"]["spec"]
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert anti["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "agent"
    for component in ("agent", "writer"):
        pod = r.deployment(component)["spec"]["template"]["spec"]
        c = r.container(component)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        env = {e["name"]: e for e in c["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        if component == "agent":  # the writer reads no namespace from its Pod
            assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
        admin = ports["admin"]
        assert r.flag(component, "--admin-addr") == [f"0.0.0.0:{admin}"]
        assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}


def test_default_tls_is_mutual_with_chart_generated_certificates(render):
    r = render()
    ns, full = r.namespace, r.fullname
    assert r.flag("agent", "--writer-url") == [f"https://{full}-writer.{ns}.svc:9443"]
    assert r.flag("agent", "--writer-ca") == ["/etc/reverser/tls/ca.crt"]
    assert r.flag("agent", "--writer-cert") == ["/etc/reverser/tls/tls.crt"]
    assert r.flag("agent", "--writer-key") == ["/etc/reverser/tls/tls.key"]
    assert r.flag("writer", "--tls-cert") == ["/etc/reverser/tls/tls.crt"]
    assert r.flag("writer", "--tls-key") == ["/etc/reverser/tls/tls.key"]
    assert r.flag("writer", "--tls-client-ca") == ["/etc/reverser/tls/ca.crt"]
    assert r.flag("writer", "--allow-plaintext") == []
    assert volumes_by_name(r.deployment("agent"))["writer-tls"]["secret"]["secretName"] == f"{full}-agent-tls"
    assert volumes_by_name(r.deployment("writer"))["tls"]["secret"]["secretName"] == f"{full}-writer-tls"
    assert mounts_by_name(r.container("writer"))["tls"]["mountPath"] == "/etc/reverser/tls"

    ca = r.get("Secret", f"{full}-ca")
    assert ca["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "ca.crt").write_bytes(base64.b64decode(ca["data"]["tls.crt"]))
        for leaf, purpose, name in [
            ("writer", "sslserver", f"{full}-writer.{ns}.svc"),
            ("agent", "sslclient", None),
        ]:
            secret = r.get("Secret", f"{full}-{leaf}-tls")
            assert secret["data"]["ca.crt"] == ca["data"]["tls.crt"]
            (tmp / f"{leaf}.crt").write_bytes(base64.b64decode(secret["data"]["tls.crt"]))
            openssl = require_tool("openssl")
            cmd = [openssl, "verify", "-purpose", purpose, "-CAfile", str(tmp / "ca.crt")]
            if name:
                cmd += ["-verify_hostname", name]
            out = subprocess.run([*cmd, str(tmp / f"{leaf}.crt")], capture_output=True, text=True)
            assert out.returncode == 0, f"{leaf} certificate does not verify: {out.stdout}{out.stderr}"


def test_plaintext_when_tls_is_off(render):
    r = render({"tls": {"enabled": False}})
    assert r.flag("writer", "--allow-plaintext") == [""]
    assert r.flag("writer", "--tls-cert") == []
    assert r.flag("agent", "--writer-url")[0].startswith("http://")
    assert r.flag("agent", "--writer-ca") == []
    # The API server calls webhooks over HTTPS only: the webhook keeps its certificate (and the CA that signs it).
    assert {s["metadata"]["name"] for s in r.all("Secret")} == {f"{r.fullname}-ca", f"{r.fullname}-webhook-tls"}
    r = render({"tls": {"enabled": False}, "agent": {"webhook": {"enabled": False}}})
    assert not r.all("Secret")


def test_tls_without_client_certificates(render):
    r = render({"tls": {"mutual": False}})
    assert r.flag("writer", "--tls-client-ca") == []
    assert r.flag("agent", "--writer-ca") == ["/etc/reverser/tls/ca.crt"]
    assert r.flag("agent", "--writer-cert") == []


def test_services_metrics_and_the_webhook_by_default(render, emulator):
    r = render()
    try:
        assert r.all("ValidatingWebhookConfiguration")
        assert r.has("Service", f"{r.fullname}-webhook")
        assert "webhook" in {p["name"] for p in r.container("agent")["ports"]}
        # The chart owns the configuration: the agent does not manage it.
        assert "--webhook-manage-configuration" not in r.args("agent")
    finally:
        emulator.request(
            "DELETE", f"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{r.fullname}"
        )
    grpc = r.get("Service", f"{r.fullname}-writer")
    assert grpc["spec"]["ports"][0]["port"] == 9443
    assert grpc["spec"]["ports"][0]["targetPort"] == "grpc"
    assert grpc["spec"]["selector"]["app.kubernetes.io/component"] == "writer"
    for component in ("agent", "writer"):
        svc = r.get("Service", f"{r.fullname}-{component}-metrics")
        assert svc["spec"]["ports"][0]["targetPort"] == "admin"
        assert svc["spec"]["selector"]["app.kubernetes.io/component"] == component


def test_the_webhook_can_be_turned_off(render):
    r = render({"agent": {"webhook": {"enabled": False}}})
    assert not r.all("ValidatingWebhookConfiguration")
    assert not r.has("Service", f"{r.fullname}-webhook")
    assert "webhook" not in {p["name"] for p in r.container("agent")["ports"]}
    assert not [a for a in r.args("agent") if a.startswith("--webhook-")]


def test_webhook_ignores_failures_and_routes_to_the_leader_only(render, emulator):
    r = render({"agent": {"webhook": {"enabled": True}}})
    try:
        [config] = r.all("ValidatingWebhookConfiguration")
        hook, requests = config["webhooks"]
        # CommitRequest CREATEs from every namespace, the release's too (their creator authors the commit).
        assert requests["name"] == "commitrequests.gitops-reverser.configbutler.ai"
        assert requests["rules"] == [{
            "apiGroups": ["configbutler.ai"], "apiVersions": ["v1alpha1"], "operations": ["CREATE"],
            "resources": ["commitrequests"], "scope": "Namespaced",
        }]
        assert "namespaceSelector" not in requests
        for key in ("failurePolicy", "sideEffects", "matchPolicy", "timeoutSeconds", "clientConfig"):
            assert requests[key] == hook[key], key
        assert hook["failurePolicy"] == "Ignore"
        assert hook["sideEffects"] == "None"
        assert hook["matchPolicy"] == "Equivalent"
        assert hook["timeoutSeconds"] == 3  # as the agent's own registration
        assert hook["admissionReviewVersions"] == ["v1"]
        # `*` never matches subresources: `kubectl scale` of built-in workloads needs its own rule to be attributed.
        scale = [rule for rule in hook["rules"] if any(res.endswith("/scale") for res in rule["resources"])]
        assert scale and "deployments/scale" in scale[0]["resources"] and scale[0]["operations"] == ["UPDATE"]
        assert hook["clientConfig"]["service"] == {
            "name": f"{r.fullname}-webhook",
            "namespace": r.namespace,
            "path": "/process-validating-webhook",
            "port": 443,
        }
        [expr] = hook["namespaceSelector"]["matchExpressions"]
        assert expr["key"] == "kubernetes.io/metadata.name"
        assert expr["operator"] == "NotIn"
        assert set(expr["values"]) == {r.namespace, "kube-system", "kube-node-lease"}
        ca = r.get("Secret", f"{r.fullname}-ca")
        assert hook["clientConfig"]["caBundle"] == ca["data"]["tls.crt"]
        assert r.get("Secret", f"{r.fullname}-webhook-tls")["data"]["ca.crt"] == ca["data"]["tls.crt"]

        svc = r.get("Service", f"{r.fullname}-webhook")
        assert svc["spec"]["selector"]["configbutler.ai/leader"] == "true"
        assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "agent"
        assert svc["spec"]["ports"][0]["targetPort"] == "webhook"
        assert {p["name"] for p in r.container("agent")["ports"]} == {"admin", "webhook"}
        assert r.flag("agent", "--webhook-addr") == ["0.0.0.0:9444"]
        assert r.flag("agent", "--webhook-cert") == ["/etc/reverser/webhook-tls/tls.crt"]
        assert r.flag("agent", "--webhook-key") == ["/etc/reverser/webhook-tls/tls.key"]
        assert hook["name"] == "attribution.gitops-reverser.configbutler.ai"
        assert mounts_by_name(r.container("agent"))["webhook-tls"]["mountPath"] == "/etc/reverser/webhook-tls"
        role = r.get("ClusterRole", f"{r.fullname}-agent")
        assert any(
            "validatingwebhookconfigurations" in rule["resources"] and rule["resourceNames"] == [r.fullname]
            for rule in role["rules"]
        )
    finally:
        # The emulator honours webhook configurations: do not leave a dangling one behind for the other tests.
        emulator.request(
            "DELETE", f"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{r.fullname}"
        )


def test_agent_can_register_the_webhook_configuration_itself(render):
    r = render({"agent": {"webhook": {"enabled": True, "createConfiguration": False}}})
    assert not r.all("ValidatingWebhookConfiguration")
    assert r.has("Service", f"{r.fullname}-webhook")
    role = r.get("ClusterRole", f"{r.fullname}-agent")
    assert verbs_for(role, "admissionregistration.k8s.io", "validatingwebhookconfigurations") == {
        "create", "get", "update", "patch"
    }
    # The leader applies the configuration named --controller-name (FULLNAME, as RBAC's resourceNames).
    assert r.flag("agent", "--controller-name") == [r.fullname]
    assert "--webhook-manage-configuration" in r.args("agent")
    assert r.flag("agent", "--webhook-ca-bundle") == ["/etc/reverser/webhook-tls/ca.crt"]
    assert r.flag("agent", "--webhook-service") == [f"{r.namespace}/{r.fullname}-webhook"]


def test_agent_rbac_follows_the_seed(render):
    r = render()
    role = r.get("ClusterRole", f"{r.fullname}-agent")
    read = {"get", "list", "watch"}
    for group, resource in [
        ("apps", "deployments"),
        ("apps", "statefulsets"),
        ("apps", "daemonsets"),
        ("", "services"),
        ("", "configmaps"),
        ("", "serviceaccounts"),
        ("networking.k8s.io", "ingresses"),
        ("networking.k8s.io", "networkpolicies"),
        ("policy", "poddisruptionbudgets"),
        ("rbac.authorization.k8s.io", "clusterrolebindings"),
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("apiregistration.k8s.io", "apiservices"),
        ("storage.k8s.io", "storageclasses"),
        ("scheduling.k8s.io", "priorityclasses"),
    ]:
        assert verbs_for(role, group, resource) == read, (group, resource)
    for resource in ("watchrules", "clusterwatchrules", "gitrepoconfigs", "gitdestinations"):
        assert verbs_for(role, "configbutler.ai", resource) == read
        assert verbs_for(role, "configbutler.ai", f"{resource}/status") == {"get", "update", "patch"}
    # CommitRequests: read, and only their status written (patch: the agent's one way to write it).
    assert verbs_for(role, "configbutler.ai", "commitrequests") == read
    assert verbs_for(role, "configbutler.ai", "commitrequests/status") == {"patch"}
    assert verbs_for(role, "", "secrets") == set(), "no Secret access by default"
    assert verbs_for(role, "", "namespaces") == read
    assert verbs_for(role, "", "events") == {"create", "patch"}
    assert verbs_for(role, "events.k8s.io", "events") == {"create", "patch"}
    assert verbs_for(role, "", "pods") == set(), "no cluster-wide Pod rights"
    assert not [g for g, _, _ in rules_of(role) if g == "*"]

    binding = r.get("ClusterRoleBinding", f"{r.fullname}-agent")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{r.fullname}-agent", "namespace": r.namespace}
    ]
    ns_role = r.get("Role", f"{r.fullname}-agent")
    assert verbs_for(ns_role, "coordination.k8s.io", "leases") == {
        "get", "list", "watch", "create", "update", "patch", "delete"
    }
    assert verbs_for(ns_role, "", "pods") == {"get", "patch"}
    writer_role = r.get("Role", f"{r.fullname}-writer")
    assert rules_of(writer_role) == [
        ("coordination.k8s.io", "leases", tuple(sorted(["get", "list", "watch", "create", "update", "patch", "delete"]))),
        ("rbac.authorization.k8s.io", "roles", ("get",)),
    ]
    # Each Role owns its component's Leases and may read only itself (for the ownerReference's uid).
    for role, component, flag in ((ns_role, "agent", "--leader-election-owner-role"), (writer_role, "writer", "--lease-owner-role")):
        [rule] = [rule for rule in role["rules"] if "roles" in rule["resources"]]
        assert rule["resourceNames"] == [role["metadata"]["name"]], rule
        assert r.flag(component, flag) == [role["metadata"]["name"]]
    assert r.get("RoleBinding", f"{r.fullname}-writer")["subjects"][0]["name"] == f"{r.fullname}-writer"
    assert verbs_for(ns_role, "", "secrets") == set(), "no fingerprint keys without readSecrets"


def test_reading_secrets_is_an_explicit_opt_in_for_sops_mirroring(render):
    r = render({"agent": {"rbac": {"readSecrets": True}}})
    role = r.get("ClusterRole", f"{r.fullname}-agent")
    assert verbs_for(role, "", "secrets") == {"get", "list", "watch"}
    ns_role = r.get("Role", f"{r.fullname}-agent")
    assert verbs_for(ns_role, "", "secrets") == {"create"}, "fingerprint keys in the release namespace only"


def secret_rules(r) -> list[tuple[str, str, tuple, tuple]]:
    """Every rule on Secrets in every Role and ClusterRole of the render: (kind/namespace/name, verbs, names)."""
    out = []
    for kind in ("ClusterRole", "Role"):
        for role in r.all(kind):
            for rule in role.get("rules", []):
                if "" in rule.get("apiGroups", []) and "secrets" in rule.get("resources", []):
                    where = f"{kind}/{role['metadata'].get('namespace', '')}/{role['metadata']['name']}"
                    out.append(
                        (where, tuple(sorted(rule["verbs"])), tuple(rule.get("resourceNames", [])))
                    )
    return sorted(out)


def test_default_values_grant_no_secret_access(render):
    r = render()
    assert secret_rules(r) == []


def test_secret_access_is_granted_per_feature_and_namespace(render):
    r = render(
        {
            "agent": {
                "rbac": {
                    "credentialsSecrets": [
                        {"namespace": "default", "names": ["repo-cred"]},
                        {"namespace": "kube-system"},
                    ],
                    "recipientsSecrets": [{"namespace": "default", "names": ["age-recipients"]}],
                }
            }
        }
    )
    f = r.fullname
    assert secret_rules(r) == sorted(
        [
            (f"Role/default/{f}-agent-credentials", ("get",), ("repo-cred",)),
            (f"Role/kube-system/{f}-agent-credentials", ("get",), ()),
            (f"Role/default/{f}-agent-recipients", ("get",), ("age-recipients",)),
        ]
    )
    for ns, purpose in [("default", "credentials"), ("kube-system", "credentials"), ("default", "recipients")]:
        [binding] = [
            b
            for b in r.all("RoleBinding")
            if b["metadata"]["namespace"] == ns and b["metadata"]["name"] == f"{f}-agent-{purpose}"
        ]
        assert binding["roleRef"]["name"] == f"{f}-agent-{purpose}"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": f"{f}-agent", "namespace": r.namespace}
        ]


def test_read_secrets_grants_only_mirroring_and_fingerprint_keys(render):
    r = render({"agent": {"rbac": {"readSecrets": True}}})
    f = r.fullname
    assert secret_rules(r) == sorted(
        [
            (f"ClusterRole//{f}-agent", ("get", "list", "watch"), ()),
            (f"Role/{r.namespace}/{f}-agent", ("create",), ()),
        ]
    )


def test_watch_all_widens_the_cluster_role(render):
    r = render({"agent": {"discovery": {"watchAll": True}}})
    role = r.get("ClusterRole", f"{r.fullname}-agent")
    assert verbs_for(role, "*", "*") == {"get", "list", "watch"}
    assert r.flag("agent", "--watch-all") == [""]


def test_git_secrets_are_mounted_as_files(render):
    r = render(
        {
            "writer": {
                "git": {
                    "credentials": {"existingSecret": "git-creds"},
                    "knownHosts": {"content": "github.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n"},
                    "caBundle": {"existingSecret": "git-ca", "key": "bundle.pem"},
                }
            }
        }
    )
    full = r.fullname
    writer = r.deployment("writer")
    vols = volumes_by_name(writer)
    mounts = mounts_by_name(r.container("writer"))
    assert vols["git-credentials"]["secret"]["secretName"] == "git-creds"
    assert mounts["git-credentials"] == {"name": "git-credentials", "mountPath": "/etc/reverser/git", "readOnly": True}
    assert r.flag("writer", "--git-credentials") == ["/etc/reverser/git/credentials.yaml"]
    assert vols["known-hosts"]["secret"]["secretName"] == f"{full}-writer-known-hosts"
    assert vols["known-hosts"]["secret"]["items"] == [{"key": "known_hosts", "path": "known_hosts"}]
    assert mounts["known-hosts"]["mountPath"] == "/etc/reverser/ssh"
    kh = r.get("Secret", f"{full}-writer-known-hosts")
    assert base64.b64decode(kh["data"]["known_hosts"]).startswith(b"github.com ssh-ed25519")
    assert vols["git-ca"]["secret"]["secretName"] == "git-ca"
    assert r.flag("writer", "--git-ca-file") == ["/etc/reverser/git-ca/bundle.pem"]


def test_existing_known_hosts_secret_wins_over_inline_content(render):
    r = render({"writer": {"git": {"knownHosts": {"existingSecret": "kh", "key": "hosts", "content": "x y z\n"}}}})
    vol = volumes_by_name(r.deployment("writer"))["known-hosts"]["secret"]
    assert vol == {"secretName": "kh", "defaultMode": 0o444, "items": [{"key": "hosts", "path": "known_hosts"}]}
    assert not r.has("Secret", f"{r.fullname}-writer-known-hosts")
    assert r.flag("writer", "--git-credentials") == []


def test_work_dir_on_empty_dir_or_pvc(render):
    r = render()
    work = volumes_by_name(r.deployment("writer"))["work"]
    assert "emptyDir" in work
    assert mounts_by_name(r.container("writer"))["work"]["mountPath"] == "/var/cache/gitops-reverser"

    r = render({"writer": {"persistence": {"enabled": True, "size": "3Gi", "storageClassName": "fast"}}})
    pvc = r.get("PersistentVolumeClaim", f"{r.fullname}-writer-work")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "3Gi"
    assert pvc["spec"]["storageClassName"] == "fast"
    work = volumes_by_name(r.deployment("writer"))["work"]
    assert work["persistentVolumeClaim"]["claimName"] == f"{r.fullname}-writer-work"

    r = render({"writer": {"persistence": {"enabled": True, "existingClaim": "mine"}}})
    assert not r.all("PersistentVolumeClaim")
    assert volumes_by_name(r.deployment("writer"))["work"]["persistentVolumeClaim"]["claimName"] == "mine"


def test_agent_only_install_with_an_external_writer(render):
    error = render({"writer": {"enabled": False}}, expect_error=True)
    assert "/agent/writer/url" in error, error

    r = render(
        {
            "writer": {"enabled": False},
            "agent": {"writer": {"url": "https://writer.example.com:443", "existingTlsSecret": "ext-writer-tls", "tlsDomain": "writer.example.com"}},
        }
    )
    assert [d["metadata"]["name"] for d in r.all("Deployment")] == [f"{r.fullname}-agent"]
    assert not [s for s in r.all("Service") if "writer" in s["metadata"]["name"]]
    assert not r.has("Role", f"{r.fullname}-writer")
    assert r.flag("agent", "--writer-url") == ["https://writer.example.com:443"]
    assert r.flag("agent", "--writer-tls-domain") == ["writer.example.com"]
    assert r.flag("agent", "--writer-cert") == ["/etc/reverser/tls/tls.crt"]
    assert volumes_by_name(r.deployment("agent"))["writer-tls"]["secret"]["secretName"] == "ext-writer-tls"
    # Only the webhook's own certificate (and its CA) is generated when the agent brings its writer certificate.
    assert {s["metadata"]["name"] for s in r.all("Secret")} == {f"{r.fullname}-ca", f"{r.fullname}-webhook-tls"}
    external = {
        "writer": {"enabled": False},
        "agent": {
            "writer": {"url": "https://writer.example.com:443", "existingTlsSecret": "ext-writer-tls"},
            "webhook": {"enabled": False},
        },
    }
    assert not render(external).all("Secret"), "no chart-generated certificates when the agent brings its own"


def test_writer_only_install(render):
    r = render({"agent": {"enabled": False}})
    assert [d["metadata"]["name"] for d in r.all("Deployment")] == [f"{r.fullname}-writer"]
    assert not r.all("ClusterRole") and not r.all("ClusterRoleBinding")
    assert not r.has("Service", f"{r.fullname}-agent-metrics")
    assert not r.all("PodDisruptionBudget")
    # The client certificate for agents elsewhere is still issued by this release's CA.
    assert r.has("Secret", f"{r.fullname}-agent-tls")
    assert "copy Secret" in r.notes


def test_cert_manager_mode(render, emulator):
    r = render({"tls": {"certManager": {"enabled": True}}, "agent": {"webhook": {"enabled": True}}})
    try:
        assert not r.all("Secret")
        issuers = {i["metadata"]["name"]: i["spec"] for i in r.all("Issuer")}
        assert issuers[f"{r.fullname}-selfsigned"] == {"selfSigned": {}}
        assert issuers[f"{r.fullname}-ca"] == {"ca": {"secretName": f"{r.fullname}-ca"}}
        certs = {c["metadata"]["name"]: c["spec"] for c in r.all("Certificate")}
        assert certs[f"{r.fullname}-ca"]["isCA"] is True
        writer = certs[f"{r.fullname}-writer"]
        assert writer["secretName"] == f"{r.fullname}-writer-tls"
        assert f"{r.fullname}-writer.{r.namespace}.svc" in writer["dnsNames"]
        assert "server auth" in writer["usages"]
        assert "client auth" in certs[f"{r.fullname}-agent"]["usages"]
        assert certs[f"{r.fullname}-webhook"]["secretName"] == f"{r.fullname}-webhook-tls"
        [config] = r.all("ValidatingWebhookConfiguration")
        assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{r.namespace}/{r.fullname}-webhook"
        assert "caBundle" not in config["webhooks"][0]["clientConfig"]
    finally:
        emulator.request(
            "DELETE", f"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{r.fullname}"
        )


def test_cert_manager_with_an_existing_issuer(render):
    r = render({"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}}})
    assert not r.all("Issuer")
    for cert in r.all("Certificate"):
        assert cert["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}


def test_service_monitors_and_disruption_budgets(render):
    r = render()
    pdb = r.get("PodDisruptionBudget", f"{r.fullname}-agent")
    assert pdb["spec"]["minAvailable"] == 1
    assert not r.all("ServiceMonitor")
    r = render(
        {
            "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
            "writer": {"podDisruptionBudget": {"enabled": True}},
        }
    )
    monitors = {m["metadata"]["name"]: m for m in r.all("ServiceMonitor")}
    assert set(monitors) == {f"{r.fullname}-agent", f"{r.fullname}-writer"}
    for component, monitor in [("agent", monitors[f"{r.fullname}-agent"]), ("writer", monitors[f"{r.fullname}-writer"])]:
        assert monitor["metadata"]["labels"]["release"] == "prom"
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        svc = r.get("Service", f"{r.fullname}-{component}-metrics")
        for k, v in monitor["spec"]["selector"]["matchLabels"].items():
            assert svc["metadata"]["labels"][k] == v
    assert r.has("PodDisruptionBudget", f"{r.fullname}-writer")


def test_scheduling_resources_and_extras(render):
    values = {
        "commonLabels": {"team": "platform"},
        "imagePullSecrets": [{"name": "regcred"}],
    }
    for component in ("agent", "writer"):
        values[component] = {
            "nodeSelector": {"pool": component},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": component, "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
            "resources": {"requests": {"cpu": "7m"}},
            "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
            "extraArgs": ["--log-format=json"],
            "podAnnotations": {"a": component},
            "image": {"repository": f"registry.example/{component}", "tag": "v9"},
        }
    r = render(values)
    for component in ("agent", "writer"):
        pod = r.deployment(component)["spec"]["template"]
        c = r.container(component)
        assert pod["spec"]["nodeSelector"] == {"pool": component}
        assert pod["spec"]["tolerations"][0]["value"] == component
        assert "nodeAffinity" in pod["spec"]["affinity"] and "podAntiAffinity" not in pod["spec"]["affinity"]
        assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["metadata"]["annotations"]["a"] == component
        assert c["resources"]["requests"]["cpu"] == "7m"
        assert {"name": "RUST_BACKTRACE", "value": "1"} in c["env"]
        assert c["args"][-1] == "--log-format=json"
        assert c["image"] == f"registry.example/{component}:v9"
        assert r.deployment(component)["metadata"]["labels"]["team"] == "platform"


def test_images_default_to_the_app_version_and_accept_digests(render):
    r = render()
    assert r.container("agent")["image"] == "ghcr.io/configbutler/gitops-reverser-agent:0.1.0"
    assert r.container("writer")["image"] == "ghcr.io/configbutler/gitops-reverser-writer:0.1.0"
    digest = "sha256:" + "a" * 64
    r = render({"writer": {"image": {"digest": digest}}})
    assert r.container("writer")["image"] == f"ghcr.io/configbutler/gitops-reverser-writer@{digest}"


def test_schema_rejects_bad_values(render):
    for bad in (
        {"agent": {"replicas": "two"}},
        {"writer": {"leases": {"mode": "sometimes"}}},
        {"agent": {"log": {"format": "xml"}}},
        {"unknownTopLevelKey": True},
    ):
        error = render(bad, expect_error=True)
        assert "schema" in error.lower() or "values" in error.lower(), error
