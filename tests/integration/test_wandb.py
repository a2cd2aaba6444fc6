"""W&B offline runs of real 2-worker trainings, read back with `wandb leet inspect --json`."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.training.driver import run_training
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
    cfg = overfit_config(wandb_env, name="wb-best", test_split=True, train={"epochs": 8},
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
    # Offline with the default `keep: best_and_last`: the offline run holds only what W&B
    # keeps, here one version (with the best policy the last model saved is the best), logged
    # once training ended; `wandb sync` uploads nothing superseded.
    assert [a["metadata"]["epoch"] for a in logged] == [best_epoch]
    assert all(a["type"] == "model" and a["name"] == "wb-best-model" for a in logged)
    best = [a for a in logged if "best" in a["aliases"]][-1]
    assert {f"epoch-{best_epoch}", "best", "last"} <= set(best["aliases"])
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


def scheduled_config(root: Path, name: str, **sections):
    """The benchmark's small workload: its monitored metric improves in epochs 1, 2, 3, 5 and
    8 of 10 whatever the weights do, so every run has exactly five improvements."""
    from workers.contract.config import RunConfig

    base = {"name": name, "storage_path": str(root / "runs"),
            "workload": {"entrypoint": "bench.workload:build", "params": {"size": "small"}},
            "scaling": {"num_workers": 2}, "train": {"epochs": 10, "batch_size": 256},
            "tracker": {"monitor": "val_scheduled_loss", "mode": "min"}}
    return RunConfig.model_validate({**base, **sections})


@pytest.mark.parametrize(
    ("policy", "log_model", "keep", "expected"),
    [
        # What W&B holds is what `keep` keeps: the best (epoch 8) and the last (epoch 10) ...
        ("all", "policy", "best_and_last", {8: ["best"], 10: ["last"]}),
        ("all", "policy", "best", {8: ["best"]}),
        # ... or every model, as the run saved it: the five improvements.
        ("best", "policy", "all", {1: [], 2: [], 3: [], 5: [], 8: ["best"]}),
        # `end`: only the final ones, after training (the last model is the best here).
        ("best", "end", "best_and_last", {8: ["last", "best"]}),
        ("best", "none", "best_and_last", {}),
    ],
)
def test_wandb_holds_the_versions_keep_keeps(wandb_env, ray_local, policy, log_model, keep,
                                             expected):
    cfg = scheduled_config(wandb_env, f"wb-{policy}-{log_model}-{keep}",
                           checkpoint={"policy": policy},
                           wandb={"mode": "offline", "log_model": log_model, "keep": keep})
    summary = run_training(cfg)
    assert [h["epoch"] for h in summary["history"] if h["is_best"]] == [1, 2, 3, 5, 8]
    assert summary["best_epoch"] == 8
    logged = artifacts(summary["wandb"]["run"])
    versions: dict[int, dict] = {}
    for artifact in logged:
        versions.setdefault(artifact["metadata"]["epoch"], []).append(artifact)
    # One version per model: the same files logged again (a moved alias) are the same version.
    assert sorted(versions) == sorted(expected)
    history = {h["epoch"]: h for h in summary["history"]}
    for epoch, found in versions.items():
        assert len({a["manifest"]["contents"][0]["digest"] for a in found}) == 1
        aliases = {alias for a in found for alias in a["aliases"]}
        assert aliases >= {f"epoch-{epoch}", *expected[epoch]}, aliases
        # Each version's metadata is that epoch's record.
        meta = found[-1]["metadata"]
        assert meta["is_best"] == history[epoch]["is_best"]
        assert meta["val_scheduled_loss"] == history[epoch]["val_scheduled_loss"]
    # `best` ends on the best epoch's version (logged live, it moved there with each
    # improvement; logged at the end, it was never anywhere else).
    holders = [a["metadata"]["epoch"] for a in best_holders(logged)]
    assert holders[-1:] == ([8] if expected else [])
    if keep != "all":
        assert set(holders) <= {8}


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
