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


def history_rows(run_dir: str) -> list[dict]:
    """Every logged row, in order."""
    rows = [json.loads(line) for line in inspect(run_dir).splitlines()]
    return [r["history"]["item"] for r in rows if r.get("type") == "history"]


def best_holders(logged: list[dict]) -> list[dict]:
    """The versions logged with the ``best`` alias, in order: W&B moves the alias to the
    newest of them."""
    return [a for a in logged if "best" in a["aliases"]]


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
    # Every epoch logged, on the epoch axis; the curves plot logged and on disk.
    epochs = [r["epoch"] for r in history_rows(run_dir) if "val_loss" in r]
    assert epochs == list(range(1, 9)) and final["epoch"] == 8
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
    # One version per model (a moved alias logs the same files again: the same version).
    assert list(dict.fromkeys(a["metadata"]["epoch"] for a in logged)) == expected
    digests = {}
    for artifact in logged:
        digest = artifact["manifest"]["contents"][0]["digest"]
        assert digests.setdefault(artifact["metadata"]["epoch"], digest) == digest
    # ``best`` ends on the summary's best epoch, and only where that epoch's model exists.
    holders = best_holders(logged)
    if summary["best_checkpoint"] and log_model != "none":
        assert holders[-1]["metadata"]["epoch"] == summary["best_epoch"]
    else:
        assert holders == []
    if checkpoint["policy"] != "best":  # never on an improvement that a later one beat
        assert {a["metadata"]["epoch"] for a in holders} <= {summary["best_epoch"]}


def test_wandb_mirrors_the_history_after_a_restart(wandb_env, ray_local):
    """Epochs trained again after a worker failure are logged again on the epoch axis (not
    dropped as past steps): the last row of each epoch is history.json's record."""
    marker = wandb_env / "failed-once"
    # 2 steps an epoch; resume checkpoints at epochs 3 and 6; the failure is in epoch 8, after
    # epoch 7 was reported, so epoch 7 is trained again from epoch 6's checkpoint.
    cfg = overfit_config(wandb_env, name="wb-restart", train={"epochs": 8},
                         failure={"max_failures": 1}, checkpoint={"resume_every_n_epochs": 3},
                         workload={"params": {"fail_after_steps": 15, "marker": str(marker)}},
                         wandb={"mode": "offline"})
    summary = run_training(cfg)
    assert marker.exists(), "the injected failure did not happen"
    rows = [r for r in history_rows(summary["wandb"]["run"]) if "val_loss" in r]
    assert len(rows) > 8, "no epoch was trained again"
    last = {r["epoch"]: r for r in rows}
    assert sorted(last) == list(range(1, 9))
    for record in summary["history"]:
        assert last[record["epoch"]]["val_loss"] == record["val_loss"]
        assert last[record["epoch"]]["is_best"] == int(record["is_best"])
    holders = best_holders(artifacts(summary["wandb"]["run"]))
    assert holders[-1]["metadata"]["epoch"] == summary["best_epoch"]
    assert run_summary(summary["wandb"]["run"])["best_epoch"] == summary["best_epoch"]
