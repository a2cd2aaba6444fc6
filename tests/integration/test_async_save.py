"""Saving off the training thread writes each epoch's own weights, not later ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.training.driver import run_training
from tests.integration.conftest import checkpoint_dirs, overfit_config
from workers.checkpoint.load import load_metadata, load_train_state, load_weights

pytestmark = pytest.mark.integration

EPOCHS = 4


def test_each_checkpoint_holds_its_epochs_weights_while_training_goes_on(tmp_path, ray_local):
    record_dir = tmp_path / "record"
    record_dir.mkdir()
    cfg = overfit_config(
        tmp_path, name="async-save", train={"epochs": EPOCHS, "batch_size": 8, "lr": 0.01},
        workload={"entrypoint": "tests.workloads.recorded:build",
                  "params": {"record_dir": str(record_dir), "last_epoch": EPOCHS}},
        checkpoint={"policy": "all"},
    )
    summary = run_training(cfg)

    # Training had moved on (an optimizer step had changed the weights) before each write
    # began, except after the last epoch, when there was no more training.
    writes = [json.loads(line) for line in (record_dir / "writes.jsonl").read_text().splitlines()]
    assert [w["epoch"] for w in writes] == list(range(1, EPOCHS + 1))
    for w in writes[:-1]:
        assert w["steps_at_write"] >= w["steps_at_record"] + 2, w

    kept = checkpoint_dirs(Path(summary["run_dir"]))
    assert [load_metadata(d)["epoch"] for d in kept] == list(range(1, EPOCHS + 1))
    previous = None
    for epoch, directory in enumerate(kept, start=1):
        saved = load_weights(directory)
        for rank in (0, 1):
            truth = torch.load(record_dir / f"epoch{epoch:04d}-rank{rank}.pt", weights_only=True)
            assert saved.keys() == truth.keys()
            for key, tensor in truth.items():
                assert torch.equal(saved[key], tensor), (epoch, rank, key)
        if previous is not None:  # the weights really changed every epoch
            assert any(not torch.equal(saved[k], previous[k]) for k in saved)
        previous = saved
        # A model checkpoint: the epoch and the tracker, no optimizer state.
        state = load_train_state(directory)
        assert state["epoch"] == epoch and "optimizer" not in state
