"""Every Appendix AA value (and every other value that maps to a flag) reaches the right container flag.

One table drives three checks: the default value renders the default flag, a non-default value renders that value,
and the flag exists in the binary's --help.
"""

import subprocess

import pytest

from conftest import binary_flags, declared_webhook_flags, require_binary

# (Appendix AA key or "-", chart value path, default flag value, non-default value, component, flag, rendered)
TABLE = [
    ("controller.discovery.refresh", "agent.discovery.refresh", "5m", "90s", "agent", "--discovery-refresh", "90s"),
    ("controller.discovery.watchAll", "agent.discovery.watchAll", None, True, "agent", "--watch-all", ""),
    ("-", "agent.discovery.keepControllerOwned", None, True, "agent", "--keep-controller-owned", ""),
    ("-", "agent.discovery.keepKubeRootCa", None, True, "agent", "--keep-kube-root-ca", ""),
    ("controller.workers.maxGlobal", "writer.workers.maxGlobal", "24", 7, "writer", "--workers-max-global", "7"),
    ("controller.workers.maxPerRepo", "writer.workers.maxPerRepo", "5", 2, "writer", "--workers-max-per-repo", "2"),
    ("controller.git.batch.maxFiles", "writer.git.batch.maxFiles", "200", 1000000, "writer", "--git-batch-max-files", "1000000"),
    ("controller.git.batch.maxBytesMiB", "writer.git.batch.maxBytesMiB", "10", 64, "writer", "--git-batch-max-bytes-mib", "64"),
    ("controller.git.batch.maxWaitSec", "writer.git.batch.maxWaitSec", "20", 2.5, "writer", "--git-batch-max-wait-sec", "2.5"),
    ("controller.deletes.capPerCycle", "writer.deletes.capPerCycle", "500", 0, "writer", "--deletes-cap-per-cycle", "0"),
    ("controller.leases.renewSec", "writer.leases.renewSec", "8", 3, "writer", "--leases-renew-sec", "3"),
    ("controller.leases.leaseSec", "writer.leases.leaseSec", "24", 9, "writer", "--leases-lease-sec", "9"),
    ("controller.workDir", "writer.workDir", "/var/cache/gitops-reverser", "/data/clones", "writer", "--work-dir", "/data/clones"),
    ("-", "writer.leases.mode", "auto", "off", "writer", "--leases", "off"),
    ("-", "writer.git.pushMaxRetries", "5", 11, "writer", "--push-max-retries", "11"),
    ("-", "writer.git.commit.name", "GitOps Reverser", "Robo: Cop #1", "writer", "--commit-name", "Robo: Cop #1"),
    ("-", "writer.git.commit.email", "gitops-reverser@noreply.cluster.local", "bot@example.com", "writer", "--commit-email", "bot@example.com"),
    ("-", "writer.maxObjectBytes", "3145728", 10485760, "writer", "--max-object-bytes", "10485760"),
    ("-", "writer.grpcPort", "0.0.0.0:9443", 7443, "writer", "--grpc-addr", "0.0.0.0:7443"),
    ("-", "writer.adminPort", "0.0.0.0:8081", 9081, "writer", "--admin-addr", "0.0.0.0:9081"),
    ("-", "writer.log.level", "info", "debug,kube=warn", "writer", "--log-level", "debug,kube=warn"),
    ("-", "writer.log.format", "plain", "json", "writer", "--log-format", "json"),
    ("-", "agent.maxUnacked", "1000", 50, "agent", "--max-unacked", "50"),
    ("-", "agent.adminPort", "0.0.0.0:8082", 9082, "agent", "--admin-addr", "0.0.0.0:9082"),
    ("-", "agent.log.level", "info", "trace", "agent", "--log-level", "trace"),
    ("-", "agent.log.format", "plain", "json", "agent", "--log-format", "json"),
    ("-", "agent.leaderElection.leaseSec", "24", 30, "agent", "--leader-election-lease-sec", "30"),
    ("-", "agent.leaderElection.renewSec", "8", 10, "agent", "--leader-election-renew-sec", "10"),
    ("-", "agent.leaderElection.name", "{full}-agent", "my-lease", "agent", "--leader-election-name", "my-lease"),
    ("-", "agent.writer.tlsDomain", None, "writer.internal", "agent", "--writer-tls-domain", "writer.internal"),
    ("-", "clusterName", None, "prod-eu", "agent", "--cluster-name", "prod-eu"),
]

EXCLUSIONS_AA = [
    "pods",
    "events",
    "events.events.k8s.io",
    "leases.coordination.k8s.io",
    "endpoints",
    "endpointslices.discovery.k8s.io",
    "controllerrevisions.apps",
    "flowschemas.flowcontrol.apiserver.k8s.io",
    "prioritylevelconfigurations.flowcontrol.apiserver.k8s.io",
    "jobs.batch",
    "cronjobs.batch",
]


def nested(path: str, value) -> dict:
    out: dict = {}
    cur = out
    parts = path.split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return out


def merge_into(target: dict, patch: dict) -> None:
    for k, v in patch.items():
        if isinstance(v, dict):
            merge_into(target.setdefault(k, {}), v)
        else:
            target[k] = v


def overrides() -> dict:
    values: dict = {}
    for _, path, _, value, *_ in TABLE:
        merge_into(values, nested(path, value))
    # Leader-election timing must stay consistent (renew < lease) for the agent to start.
    values["agent"]["discovery"]["exclusions"] = ["widgets.example.com", "leases"]
    return values


@pytest.fixture(scope="module")
def defaults(render):
    return render()


@pytest.fixture(scope="module")
def custom(render):
    return render(overrides())


@pytest.mark.parametrize("row", TABLE, ids=[row[1] for row in TABLE])
def test_default_value_renders_the_default_flag(defaults, row):
    _, _, default, _, component, flag, _ = row
    expected = [] if default is None else [default.format(full=defaults.fullname)]
    assert defaults.flag(component, flag) == expected


@pytest.mark.parametrize("row", TABLE, ids=[row[1] for row in TABLE])
def test_value_reaches_its_flag(custom, row):
    _, _, _, _, component, flag, rendered = row
    assert custom.flag(component, flag) == [rendered]


def test_exclusions_repeat_the_flag_in_order(defaults, custom):
    assert defaults.flag("agent", "--discovery-exclude") == EXCLUSIONS_AA
    assert custom.flag("agent", "--discovery-exclude") == ["widgets.example.com", "leases"]


def test_leader_election_off_drops_its_flags(render):
    r = render({"agent": {"leaderElection": {"enabled": False}, "replicas": 1}})
    assert r.flag("agent", "--leader-election") == ["false"]
    assert r.flag("agent", "--leader-election-name") == []


@pytest.fixture(scope="module")
def flags_of():
    return {component: binary_flags(component) for component in ("agent", "writer")}


@pytest.mark.parametrize("row", TABLE, ids=[row[1] for row in TABLE])
def test_flag_exists_in_the_binary(flags_of, row):
    component, flag = row[4], row[5]
    assert flag in flags_of[component], f"{flag} is not a reverser-{component} flag"


def test_every_rendered_flag_parses_with_the_real_binary(custom, defaults, tmp_path):
    """The rendered argument lists are accepted by the binaries' own parsers (checked through --help after them:
    clap parses everything first and fails on an unknown flag or a bad value before printing help)."""
    for rendered in (defaults, custom):
        for component in ("agent", "writer"):
            args = rendered.args(component)
            out = subprocess.run(
                [str(require_binary(f"reverser-{component}")), *args, "--help"],
                capture_output=True,
                text=True,
            )
            assert out.returncode == 0, f"reverser-{component} refused {args}: {out.stderr}"


def test_webhook_flags_are_accepted_by_the_agent(render, tmp_path):
    """With the webhook on and the agent managing its configuration, the agent gets every --webhook-* flag the chart
    sets, and the binary accepts them (all declared by WebhookArgs in agent/src/webhook/mod.rs)."""
    r = render({"agent": {"webhook": {"enabled": True, "createConfiguration": False}}})
    webhook_args = [a for a in r.args("agent") if a.startswith("--webhook-")]
    assert len(webhook_args) == 10
    assert {a.split("=", 1)[0] for a in webhook_args} <= declared_webhook_flags() <= binary_flags("agent")
    out = subprocess.run(
        [str(require_binary("reverser-agent")), *r.args("agent"), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
