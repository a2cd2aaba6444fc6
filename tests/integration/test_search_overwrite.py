"""`tune --overwrite` keeps the earlier search aside until a trial has checked the workload: a
workload mistake that only a trial finds (the search's probe builds the workload and runs its
first batch, but never makes its optimizer) is one line, exit 2, and the earlier search is back
byte for byte; a valid `--overwrite` then replaces it. A real local Ray, 2 trials of 1 worker."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import REPO, run_cli
from tests.workloads.mistakes import EXPECTED

pytestmark = pytest.mark.integration


def search_yaml(root: Path, mistake: str) -> str:
    config = {"name": "search", "storage_path": str(root / "runs"),
              "workload": {"entrypoint": "tests.workloads.mistakes:build",
                           "params": {"mistake": mistake}},
              "scaling": {"num_workers": 1}, "train": {"epochs": 1, "batch_size": 16},
              "wandb": {"mode": "disabled"},
              "tune": {"num_samples": 1, "max_concurrent_trials": 2,
                       "search_space": {"train.lr": {"grid": [0.01, 0.02]}}}}
    path = root / f"{mistake}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path.name


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_trials_workload_mistake_leaves_the_search_overwrite_was_to_replace(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    good, bad = search_yaml(tmp_path, "none"), search_yaml(tmp_path, "not_an_optimizer")
    search = tmp_path / "runs" / "search"

    started = time.perf_counter()
    first = run_cli(["tune", good], tmp_path, env, timeout=240)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    before = digests(search)
    assert "leaderboard.json" in before and "best_model/model.safetensors" in before
    assert any(name.startswith("trials/trial-001/checkpoint_") for name in before)

    searched = time.perf_counter()
    failed = run_cli(["tune", bad, "--overwrite"], tmp_path, env, timeout=240)
    print(f"search {searched - started:.0f} s, refused overwrite "
          f"{time.perf_counter() - searched:.0f} s")
    assert failed.returncode == 2, failed.stdout[-2000:] + failed.stderr[-3000:]
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert failed.stderr.startswith(f"error: {EXPECTED['not_an_optimizer']}"), failed.stderr
    assert digests(search) == before  # the earlier search, byte for byte
    assert sorted(p.name for p in search.parent.iterdir()) == ["search"]  # nothing aside

    replaced = run_cli(["tune", good, "--overwrite"], tmp_path, env, timeout=240)
    assert replaced.returncode == 0, replaced.stdout[-2000:] + replaced.stderr[-3000:]
    board = json.loads((search / "leaderboard.json").read_text())
    assert sorted(r["status"] for r in board["trials"]) == ["completed", "completed"]
    after = digests(search)
    assert after["leaderboard.json"] != before["leaderboard.json"]
    assert not set(after) & {n for n in before if n.startswith("_tune/attempt-")}
    assert sorted(p.name for p in search.parent.iterdir()) == ["search"]
