"""Every workload mistake of ``tests/workloads/mistakes.py`` as a rank's setup finds it, in
one process: the worker built as ``loop.runtime.start_worker`` builds it (one rank, on the
CPU, nothing restored), then ``engines.torch_engine.setup``, the code every rank runs before
its first epoch. Each is a ``UserInputError`` of one line naming the field. That such an
error crosses Ray as that line, never retried, with nothing left, is shown by real runs of
one mistake from each place (``tests/integration/test_workload_mistakes.py``). The mistakes the
driver finds (``ON_THE_DRIVER``: an empty split, a build's result without a field) are
``inspect_workload``'s, which needs no Ray for map-style splits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray.train.torch
import torch

from orchestrator.errors import UserError
from orchestrator.training.datasets import inspect_workload
from tests.workloads.mistakes import EXPECTED, ON_THE_DRIVER, TRAIN, TRAIN_OF
from workers.contract.config import RunConfig
from workers.contract.user_errors import UserInputError
from workers.engines.torch_engine import setup
from workers.loop.learner import build_workload
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


def driver_config(tmp_path, mistake: str) -> RunConfig:
    return RunConfig.model_validate({
        "name": mistake, "storage_path": str(tmp_path / "runs"),
        "workload": {"entrypoint": "tests.workloads.mistakes:build",
                     "params": {"mistake": mistake}},
        "scaling": {"num_workers": 1}, "train": TRAIN})


@pytest.mark.parametrize("mistake", list(ON_THE_DRIVER))
def test_a_mistake_the_driver_finds_is_one_line_before_any_worker(tmp_path, mistake):
    """``inspect_workload``: the workload built once on the driver, before anything is
    written or any worker starts (no Ray is needed for map-style splits)."""
    with pytest.raises(UserError) as err:
        inspect_workload(driver_config(tmp_path, mistake))
    message = str(err.value)
    assert message.startswith(ON_THE_DRIVER[mistake]), message
    assert "\n" not in message
    assert not (tmp_path / "runs").exists()


def test_an_empty_split_would_pass_the_workers_first_batch_check(tmp_path, monkeypatch):
    """Why the driver counts the samples: the workers' setup reads the training split's first
    sample only, so an empty validation split would train an epoch and record val_loss=nan."""
    cfg = driver_config(tmp_path, "empty_val")
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model, **_: model)
    workload = build_workload(cfg.workload.entrypoint, cfg.workload.params)
    setup(Worker(cfg, 0, 1, torch.device("cpu"), workload, Restored()))


def test_a_build_returning_a_dict_is_taken_as_its_keys(tmp_path, monkeypatch):
    cfg = driver_config(tmp_path, "as_dict")
    facts = inspect_workload(cfg)  # the driver accepts it
    assert facts.ray_datasets is None and facts.direction.mode == "min"
    workload = build_workload(cfg.workload.entrypoint, cfg.workload.params)
    assert isinstance(workload, SimpleNamespace) and isinstance(workload.model, torch.nn.Linear)
    assert workload.loss_fn is torch.nn.functional.cross_entropy
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model, **_: model)
    parts = setup(Worker(cfg, 0, 1, torch.device("cpu"), workload, Restored()))
    assert [m.name for m in parts.metrics] == ["accuracy"]


def test_a_ray_started_then_shut_down_in_this_process_is_not_the_one_connected(monkeypatch):
    """The driver-side checks above, after a Ray that this process started and shut down (a
    test module's, an earlier run of the Python API): no Ray is connected, so none is "the
    local one it started" (before: Ray's 'not been started yet' error from the dashboard
    lookup, in whichever test ran next on that process)."""
    from orchestrator.start import cluster

    monkeypatch.setattr(cluster, "_started_here", ["http://127.0.0.1:8265"])
    assert cluster.started_here() is False
