"""A run the cluster can never schedule is a bad input: exit 2, one line, nothing written.

Unlike the other bad configs (tests/unit/test_config.py) this one is only known after
``ray.init``, so the CLI really starts a local Ray here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_more_workers_than_cpus(tmp_path: Path) -> None:
    config = {
        "name": "too-big",
        "storage_path": "./runs",
        "workload": {"entrypoint": "workers.workloads.digits:build"},
        "train": {"epochs": 1},
        "wandb": {"mode": "disabled"},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    before = set(os.listdir(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["PYTHONDONTWRITEBYTECODE"] = "1"

    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", "cfg.yaml",
         "--set", "scaling.num_workers=64"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )

    output = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, output
    assert proc.returncode == 2, output
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("error: scaling.num_workers: 64 workers"), output
    assert "CPU" in lines[0], output
    assert not (tmp_path / "runs").exists(), output
    assert set(os.listdir(tmp_path)) == before, output
