"""docker-compose.yaml: accepted by `docker-compose config` (no engine needed), consistent with the repository and
with the binaries' flags."""

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, binary_flags, require_tool


def compose_config(*args: str) -> dict:
    tool = require_tool("docker-compose")
    out = subprocess.run(
        [tool, "-f", str(ROOT / "docker-compose.yaml"), *args, "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, f"docker-compose config refused the file: {out.stderr}"
    return yaml.safe_load(out.stdout)


def default_services(config: dict) -> set[str]:
    return {name for name, service in config["services"].items() if not service.get("profiles")}


def test_default_stack_is_writer_agent_git_server_and_emulator():
    config = compose_config()
    assert default_services(config) == {"gitserver", "emulator", "writer", "agent"}
    agent = config["services"]["agent"]
    assert "--writer-url=http://writer:9443" in agent["command"]


def test_k3s_profile_adds_a_real_cluster_and_a_second_agent():
    config = compose_config("--profile", "k3s")
    in_profile = {name for name, service in config["services"].items() if "k3s" in service.get("profiles", [])}
    assert in_profile == {"k3s", "k3s-kubeconfig", "agent-k3s"}


@pytest.mark.parametrize("profile", [(), ("--profile", "k3s")])
def test_bind_mounts_and_dockerfiles_exist(profile):
    config = compose_config(*profile)
    for name, service in config["services"].items():
        build = service.get("build")
        if build:
            assert (ROOT / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} is missing"
        for volume in service.get("volumes", []):
            # docker-compose v1 prints short syntax (SOURCE:TARGET[:MODE]); bind mounts have absolute sources.
            source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: {source} is missing"


def test_commands_use_real_flags():
    config = compose_config("--profile", "k3s")
    for service, binary in [("writer", "writer"), ("agent", "agent"), ("agent-k3s", "agent")]:
        flags = binary_flags(binary)
        for arg in config["services"][service]["command"]:
            assert arg.split("=", 1)[0] in flags, f"{service}: {arg} is not a reverser-{binary} flag"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.agent", "Dockerfile.writer", "docker/Dockerfile.emulator"])
def test_dockerfiles_are_multi_stage_and_non_root(dockerfile):
    text = (ROOT / dockerfile).read_text()
    froms = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(froms) == 2 and froms[0].startswith("FROM rust:")
    assert "distroless" in froms[1] and ":nonroot" in froms[1]
    assert "USER 65532:65532" in text
    toolchain = (ROOT / "rust-toolchain.toml").read_text()
    version = froms[0].split()[1].split(":")[1].split("-")[0]
    assert f'"{version}.' in toolchain or f'"{version}"' in toolchain, "builder image and rust-toolchain.toml disagree"
