"""`helm lint` (the real Helm engine) with the chart's defaults and with non-default values.

helm-sdkpy's Lint takes no values, so each case lints a copy of the chart whose values.yaml holds the merged values
(which also runs the values.schema.json check on them).
"""

import shutil

import pytest
import yaml

from conftest import CHART, deep_merge, default_values, run_helm

INFO, WARNING, ERROR = 1, 2, 3

CASES = {
    "defaults": {},
    "webhook-and-watch-all": {"agent": {"webhook": {"enabled": True}, "discovery": {"watchAll": True}}},
    "cert-manager": {"tls": {"certManager": {"enabled": True}}, "agent": {"webhook": {"enabled": True}}},
    "plaintext": {"tls": {"enabled": False}},
    "agent-only": {"writer": {"enabled": False}, "agent": {"writer": {"url": "http://writer.example:9443"}}},
    "writer-only": {"agent": {"enabled": False}},
    "webhook-hardened": {
        "agent": {
            "webhook": {
                "createConfiguration": False,
                "clientAuth": {"existingSecret": "apiserver-client-ca", "allowedNames": ["kube-apiserver"]},
                "networkPolicy": {
                    "enabled": True,
                    "from": [{"ipBlock": {"cidr": "10.0.0.10/32"}}],
                    "adminFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
                },
            }
        }
    },
    "everything-on": {
        "metrics": {"serviceMonitor": {"enabled": True}},
        "writer": {
            "persistence": {"enabled": True},
            "podDisruptionBudget": {"enabled": True},
            "git": {"credentials": {"existingSecret": "c"}, "knownHosts": {"content": "h k v\n"}, "caBundle": {"existingSecret": "ca"}},
        },
    },
}


def lint(emulator, tmp_path, overrides: dict) -> list[dict]:
    chart = tmp_path / "gitops-reverser"
    shutil.copytree(CHART, chart)
    (chart / "values.yaml").write_text(yaml.safe_dump(deep_merge(default_values(), overrides)))
    [result] = run_helm(emulator, "default", [{"op": "lint", "chart": str(chart)}])
    assert result["ok"], result.get("error")
    return result["lint"]


@pytest.mark.parametrize("name", CASES)
def test_lint_passes(emulator, tmp_path, name):
    report = lint(emulator, tmp_path, CASES[name])
    assert report["TotalChartsLinted"] == 1
    bad = [m for m in report["Messages"] if m["Severity"] >= WARNING]
    assert not bad and not report["Errors"], f"lint found problems in {[m['Path'] for m in bad]}"


def test_lint_catches_schema_violations(emulator, tmp_path):
    report = lint(emulator, tmp_path, {"writer": {"leases": {"mode": "sometimes"}}})
    assert any(m["Severity"] == ERROR and m["Path"] == "values.yaml" for m in report["Messages"])


@pytest.mark.parametrize(
    "overrides",
    [
        {"writer": {"enabled": False}},  # an agent needs a writer URL
        {"agent": {"leaderElection": {"enabled": False}}},  # two replicas without leader election
    ],
)
def test_lint_catches_inconsistent_values(emulator, tmp_path, overrides):
    # Helm's lint mode turns `fail` into a log line, so these rules live in values.schema.json.
    report = lint(emulator, tmp_path, overrides)
    assert any(m["Severity"] == ERROR and m["Path"] == "values.yaml" for m in report["Messages"])
