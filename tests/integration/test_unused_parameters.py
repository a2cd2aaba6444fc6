"""A model with parameters a training step does not use (a head forward never calls, LayerDrop
skipping blocks differently on each rank, a frozen layer, BatchNorm and dropout), trained by
the real CLI on 2 workers: under ddp with ``scaling.find_unused_parameters: auto`` (and the
workload's own optimizer, built from the plain model's submodules) and under fsdp. Each run
completes, and its saved best model, loaded into a fresh workload model in one process, scores
what the run recorded on val and test (1e-6 relative)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.integration.conftest import REPO, assert_close, run_cli
from tests.workloads.unused_params import build
from workers.evaluation.metrics import build_metrics
from workers.loop.scoring import evaluate_dataset

pytestmark = pytest.mark.integration

BATCH = 16
RUNS = {
    # LayerDrop on: the ranks skip different blocks; auto finds the unused head first.
    # -v: the workers' logs shown, where auto's one line is.
    "ddp": {"strategy": "ddp", "params": {"layerdrop": 0.3, "params": True}, "args": ["-v"]},
    # FSDP2 cannot take rank-dependent LayerDrop (docs/fsdp.md): the unused head, the frozen
    # layer and the blocks of a ModuleList (each its own unit) it can.
    "fsdp": {"strategy": "fsdp", "params": {"layerdrop": 0.0, "params": True}},
}


def train(tmp: Path, name: str) -> dict[str, Any]:
    spec = RUNS[name]
    config = {
        "name": name,
        "storage_path": str(tmp / "runs"),
        "seed": 0,
        "workload": {"entrypoint": "tests.workloads.unused_params:build",
                     "params": spec["params"]},
        "scaling": {"num_workers": 2, "strategy": spec["strategy"],
                    "find_unused_parameters": "auto"},
        "train": {"epochs": 3, "batch_size": BATCH, "lr": 0.01},
        "tracker": {"monitor": "val_loss"},
        "wandb": {"mode": "disabled"},
    }
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    proc = run_cli(["train", "cfg.yaml", *spec.get("args", [])], cwd=tmp, env=env,
                   timeout=400)
    summary_file = tmp / "runs" / name / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    return {"proc": proc, "summary": summary, "params": spec["params"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``get(name)``: that run, trained once for the whole module."""
    done: dict[str, dict[str, Any]] = {}

    def get(name: str) -> dict[str, Any]:
        if name not in done:
            done[name] = train(tmp_path_factory.mktemp(name), name)
        return done[name]

    return get


def rescored(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The saved best model in one process: every split's metrics."""
    workload = build(**run["params"])
    model = workload.model
    model.load_state_dict(load_file(Path(run["summary"]["best_checkpoint"])
                                    / "model.safetensors"))
    out = {}
    for split in ("val", "test"):
        metrics = build_metrics(["accuracy"], 3)
        out[split] = evaluate_dataset(model, getattr(workload, f"{split}_dataset"),
                                      workload.loss_fn, metrics, split=split,
                                      batch_size=BATCH, device=torch.device("cpu"))
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_run_completes_and_its_best_model_scores_what_it_recorded(runs: Any, name: str) -> None:
    run = runs(name)
    proc = run["proc"]
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    summary = run["summary"]
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    scores = rescored(run)
    for split, recorded in (("val", summary["best_metrics"]), ("test", summary["test_metrics"])):
        assert scores[split], split
        for key, value in scores[split].items():
            assert_close(value, recorded[key])


def test_auto_says_once_that_ddp_looks_for_unused_parameters(runs: Any) -> None:
    run = runs("ddp")
    output = run["proc"].stdout + run["proc"].stderr
    lines = [line for line in output.splitlines()
             if "find_unused_parameters: auto" in line]
    assert len(lines) == 1, output[-3000:]
    assert "aux_head.weight" in lines[0] and "frozen" not in lines[0]
