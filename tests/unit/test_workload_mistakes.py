"""Every workload mistake of ``tests/workloads/mistakes.py`` as a rank's setup finds it, in
one process: the worker built as ``loop.runtime.start_worker`` builds it (one rank, on the
CPU, nothing restored), then ``engines.torch_engine.setup``, the code every rank runs before
its first epoch. Each is a ``UserInputError`` of one line naming the field. That such an
error crosses Ray as that line, never retried, with nothing left, is shown by real runs of
one mistake from each place (``tests/integration/test_workload_mistakes.py``)."""

from __future__ import annotations

import pytest
import ray.train.torch
import torch

from tests.workloads.mistakes import EXPECTED, TRAIN, TRAIN_OF
from workers.contract.config import RunConfig
from workers.contract.errors import UserInputError
from workers.contract.workload import build_workload
from workers.engines.torch_engine import setup
from workers.loop.runtime import Restored, Worker


@pytest.mark.parametrize("mistake", list(EXPECTED))
def test_each_mistake_is_one_line_naming_the_field(tmp_path, monkeypatch, mistake):
    cfg = RunConfig.model_validate({
        "name": mistake, "storage_path": str(tmp_path / "runs"),
        "workload": {"entrypoint": "tests.workloads.mistakes:build",
                     "params": {"mistake": mistake}},
        "scaling": {"num_workers": 1}, "train": {**TRAIN, **TRAIN_OF.get(mistake, {})}})
    # One rank: Ray Train's prepare_model would only move the model to the device (the CPU).
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model, **_: model)
    with pytest.raises(UserInputError) as err:
        torch.manual_seed(cfg.seed)
        workload = build_workload(cfg.workload.entrypoint, cfg.workload.params)
        setup(Worker(cfg, 0, 1, torch.device("cpu"), workload, Restored()))
    message = str(err.value)
    assert EXPECTED[mistake] in message, message
    assert "\n" not in message
