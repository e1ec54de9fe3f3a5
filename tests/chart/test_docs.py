"""The chart README documents every value and agrees with both binaries' --help on every flag."""

import re

import pytest

from conftest import CHART, binary_flags, declared_webhook_flags, default_values

README = (CHART / "README.md").read_text()
# Values documented as a whole (free-form objects or lists of objects).
OPAQUE = {"resources", "podSecurityContext", "securityContext", "rules", "issuerRef"}


def leaves(values: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in OPAQUE:
            out += leaves(value, path + ".")
        else:
            out.append(path)
    return out


def section(title: str) -> str:
    match = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^##)", README, re.MULTILINE | re.DOTALL)
    assert match, f"README has no section '### {title}'"
    return match.group(1)


@pytest.mark.parametrize("path", leaves(default_values()))
def test_every_value_is_documented(path):
    assert re.search(rf"^\| `{re.escape(path)}` \|", README, re.MULTILINE), f"README does not list `{path}`"


def test_documented_values_exist():
    known = set(leaves(default_values()))
    tables = "".join(section(title) for title in ("Global", "Agent", "Writer", "TLS"))
    documented = set(re.findall(r"^\| `([a-zA-Z][\w.]*)` \|", tables, re.MULTILINE))
    assert documented - known == set(), "README lists values that values.yaml does not have"


def table_flags(title: str) -> set[str]:
    return set(re.findall(r"^\| `(--[a-z0-9-]+)` \|", section(title), re.MULTILINE))


def test_readme_and_help_agree_on_every_writer_flag():
    documented, actual = table_flags("Writer flags"), binary_flags("writer")
    assert actual - documented == set(), "reverser-writer flags missing from the README"
    assert documented - actual == set(), "README documents flags reverser-writer does not have"


def test_readme_and_help_agree_on_every_agent_flag():
    documented = table_flags("Agent flags")
    actual = binary_flags("agent")
    assert actual - documented == set(), "reverser-agent flags missing from the README"
    assert documented - actual == set(), "README documents flags reverser-agent does not have"
    # The webhook flags come from WebhookArgs, flattened into the agent's flags.
    assert declared_webhook_flags() <= actual


def test_every_flag_mentioned_anywhere_exists():
    flags = binary_flags("agent") | binary_flags("writer") | declared_webhook_flags()
    mentioned = set(re.findall(r"`(--[a-z][a-z0-9-]*)", README))
    # Helm's, clap's and kube-apiserver's own flags, named in prose.
    assert mentioned - flags - {"--dry-run", "--help", "--force-conflicts", "--admission-control-config-file"} == set()
