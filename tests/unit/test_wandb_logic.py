"""W&B decisions that need no W&B run: which models to log, the mode, the summary keys."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.wandb_log import artifact_name, best_summary, should_log_model, wandb_mode

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("log_model", "saved_because", "is_best", "expected"),
    [
        ("policy", "best", True, True),
        ("policy", "every_n", False, True),
        ("policy", "all", True, True),
        ("policy", "last", False, True),
        ("policy", "resume", False, False),  # fault-tolerance copies are not the policy's
        ("best", "all", False, False),
        ("best", "all", True, True),
        ("best", "resume", True, True),
        ("none", "best", True, False),
    ],
)
def test_should_log_model(log_model, saved_because, is_best, expected):
    assert should_log_model(log_model, saved_because, is_best) is expected


def test_auto_mode_follows_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled" and wandb_mode("offline") == "offline"


def test_best_summary_keys_come_from_one_record():
    best = {"epoch": 4, "train_loss": 0.3, "val_loss": 0.4, "val_mcc": 0.8, "monitor": "val_loss",
            "mode": "min", "is_best": True, "seed": 0, "world_size": 2}
    out = best_summary(best, {"test_loss": 0.5, "test_mcc": 0.7})
    assert out == {"best_epoch": 4, "best_train_loss": 0.3, "best_val_loss": 0.4,
                   "best_val_mcc": 0.8, "test_loss": 0.5, "test_mcc": 0.7}


def test_artifact_name_is_valid():
    assert artifact_name("my run/1") == "my-run-1-model"


def test_disabled_imports_nothing_from_wandb():
    code = (
        "import sys\n"
        "from workers.config import RunConfig\n"
        "from orchestrator.wandb_log import open_run, NullRun\n"
        "cfg = RunConfig.model_validate({'workload': {'entrypoint': 'a:b'},"
        " 'wandb': {'mode': 'disabled'}})\n"
        "assert isinstance(open_run(cfg, '/nonexistent'), NullRun)\n"
        "assert not any(m == 'wandb' or m.startswith('wandb.') for m in sys.modules), 'wandb'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
