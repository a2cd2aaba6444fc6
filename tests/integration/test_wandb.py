"""W&B offline runs of real 2-worker trainings, read back with `wandb leet inspect --json`."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.train import run_training
from tests.integration.conftest import overfit_config

pytestmark = pytest.mark.integration

API_KEY_MARKER = "local-9f3c2e1d0b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e"
WANDB_CLI = str(Path(sys.executable).parent / "wandb")


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        path = tmp_path / var.lower()
        path.mkdir()
        monkeypatch.setenv(var, str(path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", API_KEY_MARKER)
    return tmp_path


def inspect(run_dir: str, *flags: str) -> str:
    proc = subprocess.run([WANDB_CLI, "leet", "inspect", "--json", *flags, run_dir],
                          capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout


def run_summary(run_dir: str) -> dict:
    """The run's final state (``--summary`` prints one JSON document)."""
    return json.loads(inspect(run_dir, "--summary"))["summary"]


def artifacts(run_dir: str) -> list[dict]:
    found = []
    for line in inspect(run_dir).splitlines():  # one JSON record per line
        record = json.loads(line)
        if record.get("type") == "artifact":
            artifact = record["artifact"]
            artifact["metadata"] = json.loads(artifact.get("metadata") or "{}")
            found.append(artifact)
    return found


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_best_artifact_carries_the_best_epochs_metadata(wandb_env, ray_local):
    cfg = overfit_config(wandb_env, name="wb-best", train={"epochs": 8},
                         wandb={"mode": "offline"})
    summary = run_training(cfg)
    history = summary["history"]
    best_epoch = summary["best_epoch"]
    assert 1 < best_epoch < 8, "the monitored metric must peak in the middle"
    best_record = history[best_epoch - 1]

    run_dir = summary["wandb"]["run"]
    assert summary["wandb"]["mode"] == "offline" and Path(run_dir).is_dir()
    assert summary["wandb"]["artifact"] == "wb-best-model"

    logged = artifacts(run_dir)
    # One version per persisted model: with the best policy, only the improvements.
    assert [a["metadata"]["epoch"] for a in logged] == [h["epoch"] for h in history
                                                          if h["is_best"]]
    assert all(a["type"] == "model" and a["name"] == "wb-best-model" for a in logged)
    best = [a for a in logged if "best" in a["aliases"]][-1]
    assert f"epoch-{best_epoch}" in best["aliases"]
    meta = best["metadata"]
    assert meta["epoch"] == best_epoch and meta["is_best"] is True
    assert meta["monitor"] == "val_loss" and meta["mode"] == "min"
    for key in ("train_loss", "val_loss", "val_accuracy", "val_mcc"):
        assert meta[key] == best_record[key], key  # numbers, not strings

    # The artifact's file is byte-for-byte the best checkpoint's weights.
    files = {c["path"]: c for c in best["manifest"]["contents"]}
    weights = Path(summary["best_checkpoint"]) / "model.safetensors"
    assert files["model.safetensors"]["digest"] == md5_b64(weights)

    final = run_summary(run_dir)
    assert final["best_epoch"] == best_epoch
    for key in ("train_loss", "val_loss", "val_accuracy", "val_mcc"):
        assert final[f"best_{key}"] == meta[key]
    for key, value in summary["test_metrics"].items():
        assert final[key] == value
    # Every epoch logged, with the epoch as the step; the curves plot logged and on disk.
    assert final["_step"] == 8 and final["epoch"] == 8
    assert "training_curves.format" in json.dumps(final) or "training_curves" in final
    assert (Path(summary["run_dir"]) / "training_curves.png").stat().st_size > 1000

    # The API key in the environment never reaches a file the run wrote.
    for root in (Path(summary["run_dir"]), wandb_env):
        for path in root.rglob("*"):
            if path.is_file():
                assert API_KEY_MARKER.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("checkpoint", "log_model", "expected"),
    [
        ({"policy": "all"}, "best", "improvements"),
        ({"policy": "every_n", "every_n_epochs": 2}, "policy", [2, 4]),
        ({"policy": "last"}, "policy", [4]),
        ({"policy": "best"}, "none", []),
    ],
)
def test_log_model_choices(wandb_env, ray_local, checkpoint, log_model, expected):
    cfg = overfit_config(wandb_env, name=f"wb-{checkpoint['policy']}-{log_model}",
                         train={"epochs": 4}, checkpoint=checkpoint,
                         wandb={"mode": "offline", "log_model": log_model})
    summary = run_training(cfg)
    if expected == "improvements":
        expected = [h["epoch"] for h in summary["history"] if h["is_best"]]
    logged = artifacts(summary["wandb"]["run"])
    assert [a["metadata"]["epoch"] for a in logged] == expected
    for artifact in logged:
        assert ("best" in artifact["aliases"]) == artifact["metadata"]["is_best"]
