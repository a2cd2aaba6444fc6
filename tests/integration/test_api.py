"""The Python API end to end: a run trained from a mapping of config keys, its typed summary,
and ``load_best``'s model re-scored in this process against the record."""

from __future__ import annotations

import pytest
import torch

from orchestrator import load_best, train
from orchestrator.errors import UserError
from tests.integration.conftest import assert_close, own_state_api

pytestmark = pytest.mark.integration


def rescore(model: torch.nn.Module, dataset) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the whole dataset, in one process, float64."""
    x, y = dataset.tensors
    with torch.no_grad():
        logits = model(x).double()
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum").item() / len(y)
    return loss, (logits.argmax(1) == y).double().mean().item()


def test_train_from_a_mapping_then_load_best(tmp_path, ray_local):
    config = {
        "name": "api-run", "storage_path": str(tmp_path / "runs"),
        "workload": {"entrypoint": "tests.workloads.overfit:build",
                     "params": {"norm": True, "dropout": 0.2}},
        "scaling": {"num_workers": 2}, "train": {"epochs": 6, "batch_size": 8, "lr": 0.002},
        "wandb": {"mode": "disabled"},
    }
    summary = train(config, {"train.epochs": 7})
    assert summary.status == "completed" and summary.epochs_completed == 7
    losses = [h["val_loss"] for h in summary.history]
    assert summary.best_epoch == losses.index(min(losses)) + 1
    assert summary.best_value == min(losses)

    best = load_best(summary.run_dir)
    assert best.metadata["epoch"] == summary.best_epoch
    assert best.checkpoint == summary.best_checkpoint
    assert not best.model.training  # ready to score: dropout off, BatchNorm's running stats
    val_loss, val_acc = rescore(best.model, best.workload.val_dataset)
    assert_close(val_loss, summary.best_metrics["val_loss"])
    assert_close(val_acc, summary.best_metrics["val_accuracy"])
    test_loss, _ = rescore(best.model, best.workload.test_dataset)
    assert_close(test_loss, summary.test_metrics["test_loss"])

    # The same directory again without --resume/--overwrite: the CLI's one-line refusal.
    with pytest.raises(UserError, match="already exists; pass --resume"):
        train(config)

    # Another run from the same Python session: the session's one run channel serves it
    # (an actor process started once, not once a run).
    again = train({**config, "name": "api-run-2"},
                  {"train.epochs": 1, "checkpoint.policy": "none"})
    assert again.status == "completed" and again.epochs_completed == 1
    channels = actors("_Channel")
    assert len(channels) == 1 and channels[0].state == "ALIVE", channels
    # A local Ray is one node, the driver's: no preemption watcher was started for either run.
    assert actors("PreemptionWatcher") == []
    # Neither run has a Ray Dataset: no dataset manager either.
    assert actors("DatasetManager") == []


def actors(class_name: str) -> list:
    """Every actor of that class this module's local Ray has had, alive or dead, from its
    state API."""
    from ray.util.state import list_actors

    return list_actors(address=own_state_api(), filters=[("class_name", "=", class_name)])
