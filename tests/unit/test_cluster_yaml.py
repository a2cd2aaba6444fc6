"""cluster.yaml passes Ray's own cluster-config checks, offline: the launcher's own steps
before it talks to a cloud (defaults merged, node types filled in, then the JSON schema).
Its setup commands pick a supported Python whatever the image's `python3` is (the full
install they then run is `make test-cluster-setup`: too slow for this tier)."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
PYENV = Path.home() / ".pyenv" / "versions"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check(config: dict) -> None:
    validate_config(prepare_config(config))  # what `ray up` does first


def test_cluster_yaml_is_valid(config):
    check(config)
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] > 1 and workers["max_workers"] >= 1
    assert config["available_node_types"]["head"]["resources"].get("GPU", 0) == 0
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert any("pip install -e /home/ubuntu/orchestrator" in c for c in config["setup_commands"])


def requires_python() -> SpecifierSet:
    text = (REPO / "pyproject.toml").read_text()
    return SpecifierSet(re.search(r'^requires-python = "([^"]+)"', text, re.M).group(1))


def test_setup_tries_every_supported_python_newest_first(config):
    tried = re.search(r"for v in ([\d. ]+); do", config["setup_commands"][0]).group(1).split()
    supported = [f"3.{m}" for m in range(30, 5, -1) if f"3.{m}" in requires_python()]
    assert tried == supported and "3.10" in tried  # the Deep Learning AMI's python3


def make_venv_commands(config: dict) -> list[str]:
    """The setup commands before the first pip install: the ones that make ~/venv."""
    commands = config["setup_commands"]
    first_pip = next(i for i, c in enumerate(commands) if "pip install" in c)
    return commands[:first_pip]


def run_on_image(commands: list[str], image_bin: Path, home: Path) -> subprocess.CompletedProcess:
    """Each command as Ray's launcher runs it (its own bash), on an image whose PATH is only
    IMAGE_BIN: no interpreter of this machine's leaks in."""
    env = {"HOME": str(home), "PATH": str(image_bin)}
    for command in commands:
        proc = subprocess.run(["/bin/bash", "-c", command], env=env, capture_output=True,
                              text=True, timeout=300)
        if proc.returncode:
            return proc
    return proc


def pyenv_python(minor: str) -> Path:
    found = sorted(PYENV.glob(f"{minor}.*/bin/python{minor}"))
    if not found:
        pytest.skip(f"no Python {minor} under {PYENV}")
    return found[-1]


def test_setup_makes_the_venv_with_the_newest_supported_python(config, tmp_path):
    image = tmp_path / "bin"  # python3 is 3.10, as on the Deep Learning AMI; 3.13 beside it
    image.mkdir()
    for name, minor in [("python3", "3.10"), ("python3.10", "3.10"), ("python3.13", "3.13")]:
        (image / name).symlink_to(pyenv_python(minor))
    proc = run_on_image(make_venv_commands(config), image, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{image}/python3.13 makes ~/venv" in proc.stdout
    version = subprocess.run([tmp_path / "venv/bin/python", "--version"], capture_output=True,
                             text=True, check=True).stdout
    assert version.startswith("Python 3.13.")


def test_setup_stops_on_an_image_without_a_supported_python(config, tmp_path):
    image = tmp_path / "bin"
    image.mkdir()
    (image / "python3").write_text("#!/bin/sh\necho Python 3.9.18\n")
    (image / "python3").chmod(0o755)
    proc = run_on_image(make_venv_commands(config), image, tmp_path)
    assert proc.returncode == 1 and not (tmp_path / "venv").exists()
    assert "no Python 3.10-3.13 with venv here (python3 is Python 3.9.18)" in proc.stderr


@pytest.mark.parametrize(
    "breakage",
    ["no head node type", "head type not defined", "unknown key", "worker count not a number"],
)
def test_broken_copies_are_rejected(config, breakage):
    broken = copy.deepcopy(config)
    if breakage == "no head node type":
        del broken["head_node_type"]
    elif breakage == "head type not defined":
        broken["head_node_type"] = "missing"
    elif breakage == "unknown key":
        broken["worker_nodes_typo"] = {}
    else:
        broken["available_node_types"]["gpu_worker"]["max_workers"] = "four"
    with pytest.raises(Exception):  # noqa: B017 - jsonschema or Ray's ValueError, both reject
        check(broken)
