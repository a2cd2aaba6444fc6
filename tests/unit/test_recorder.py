"""The controller's record of a run (``RunRecorder``), fed as Ray Train feeds it: a list of
every worker's metrics per report and the persisted checkpoint (an object with a ``path``)
or None. No Ray runs: the event queue is a list, the controller's own handle a string. The
events it sends the driver are typed (``training.events``) and cross processes: they pickle."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray

from orchestrator.results.history import read_history
from orchestrator.training.events import (
    ControllerStarted,
    EpochEvent,
    Preempted,
    UserErrorEvent,
    WorkerFailed,
)
from orchestrator.training.recorder import RunRecorder
from tests.unit.run_files import epoch_metrics, write_checkpoint_dir
from workers.contract.names import (
    HISTORY_FILE,
    HISTORY_SEGMENTS_DIR,
    MODEL_FILE,
    PREEMPT_KEY,
    RANK_KEY,
    STAGED_FILES,
    STAGING_DIR,
)
from workers.contract.user_errors import UserInputError


class Events(list):
    def put(self, item: Any) -> None:
        self.append(pickle.loads(pickle.dumps(item)))  # through the channel actor


@pytest.fixture
def events(monkeypatch):
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: SimpleNamespace(current_actor="the controller"))
    return Events()


def report(recorder: RunRecorder, epoch: int, val_loss: float, is_best: bool,
           checkpoint: Path | None = None, workers: int = 2) -> None:
    """One ``ray.train.report`` of every worker: rank 0's metrics first; the others report
    their own (Ray passes them too) and must not end up in the record."""
    rank0 = {**epoch_metrics(epoch, val_loss), "is_best": is_best, RANK_KEY: float(epoch),
             "epoch_seconds": 0.5}
    others = [{**rank0, "val_loss": -1.0, "is_best": not is_best}] * (workers - 1)
    recorder.after_report(None, [rank0, *others],
                          SimpleNamespace(path=str(checkpoint)) if checkpoint else None)


def test_each_report_is_appended_to_history_in_order_with_rank_zeros_metrics(tmp_path):
    best = write_checkpoint_dir(tmp_path, 2, 0.5, is_best=True)
    recorder = RunRecorder(str(tmp_path), "none")
    report(recorder, 1, 0.9, True)
    assert [r["epoch"] for r in read_history(str(tmp_path))] == [1]
    report(recorder, 2, 0.5, True, best)
    report(recorder, 3, 0.7, False)
    history = read_history(str(tmp_path))
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r["val_loss"] for r in history] == [0.9, 0.5, 0.7]
    assert [r["checkpoint"] for r in history] == [None, best.name, None]
    assert history[1] == {**epoch_metrics(2, 0.5), "is_best": True, "epoch_seconds": 0.5,
                          "checkpoint": best.name}  # the ranking Ray keeps by is internal
    assert not (tmp_path / STAGING_DIR).exists()  # W&B off: nothing set aside


def test_a_restarted_epoch_replaces_the_records_from_there_on(tmp_path):
    recorder = RunRecorder(str(tmp_path), "none")
    for epoch, loss in enumerate([0.9, 0.8, 0.85, 0.95], start=1):
        report(recorder, epoch, loss, epoch <= 2)
    # The worker group restarted from epoch 2's checkpoint: epoch 3 is trained again.
    report(recorder, 3, 0.6, True)
    history = read_history(str(tmp_path))
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["val_loss"] == 0.6 and history[-1]["is_best"] is True


def test_a_new_controller_continues_the_history_it_finds(tmp_path):
    """A resumed run (``--resume``) or a Tune trial restored: a fresh recorder reads the file
    before its first report."""
    first = RunRecorder(str(tmp_path), "none")
    for epoch in (1, 2, 3):
        report(first, epoch, 1.0 / epoch, True)
    second = RunRecorder(str(tmp_path), "none")
    report(second, 3, 0.2, True)  # continued from epoch 2's checkpoint
    report(second, 4, 0.1, True)
    history = read_history(str(tmp_path))
    assert [(r["epoch"], r["val_loss"]) for r in history] == [(1, 1.0), (2, 0.5), (3, 0.2),
                                                            (4, 0.1)]


@pytest.mark.parametrize(
    ("log_model", "staged"),
    # What a live W&B run passes (``WandbRun.log_model_setting``); ``none`` when W&B is off
    # or logs its models at the end.
    [("none", []), ("best", [1, 3]), ("policy", [1, 3, 4])],
)
def test_models_are_staged_for_wandb_only_as_its_setting_asks(tmp_path, events, log_model,
                                                             staged):
    checkpoints = {1: write_checkpoint_dir(tmp_path, 1, 0.9, is_best=True),
                   2: write_checkpoint_dir(tmp_path, 2, 0.95, is_best=False,
                                           saved_because="resume"),
                   3: write_checkpoint_dir(tmp_path, 3, 0.7, is_best=True),
                   4: write_checkpoint_dir(tmp_path, 4, 0.8, is_best=False,
                                           saved_because="all")}
    recorder = RunRecorder(str(tmp_path), log_model, events)
    # Epoch 2: a resume-only checkpoint (not a model the policy asked for); 4: saved by the
    # policy (``all``), not an improvement; 5: no checkpoint.
    for epoch, loss, best in ((1, 0.9, True), (2, 0.95, False), (3, 0.7, True), (4, 0.8, False),
                              (5, 0.85, False)):
        report(recorder, epoch, loss, best, checkpoints.get(epoch))

    staging = tmp_path / STAGING_DIR
    on_disk = sorted(p.name for p in staging.iterdir()) if staging.exists() else []
    assert on_disk == [checkpoints[e].name for e in staged]
    for epoch in staged:
        for name in STAGED_FILES:  # the model and its metadata, the same bytes
            copy, original = staging / checkpoints[epoch].name / name, checkpoints[epoch] / name
            assert copy.read_bytes() == original.read_bytes()
        # A hard link: Ray deleting the checkpoint (num_to_keep) leaves W&B its file.
        assert os.path.samefile(staging / checkpoints[epoch].name / MODEL_FILE,
                                checkpoints[epoch] / MODEL_FILE)
    # The driver hears of every epoch, in order, with the staged path where there is one.
    assert events[0] == ControllerStarted("the controller")
    records = events[1:]
    assert all(isinstance(event, EpochEvent) for event in records)
    assert [event.record["epoch"] for event in records] == [1, 2, 3, 4, 5]
    assert [event.staged for event in records] == [
        str(staging / checkpoints[e].name) if e in staged else None for e in range(1, 6)]
    assert records[1].record == read_history(str(tmp_path))[1]  # as the history holds it


def test_a_user_error_among_worker_exceptions_is_sent_to_the_driver_once(tmp_path, events):
    recorder = RunRecorder(str(tmp_path), "none", events)
    wrapped = RuntimeError("Traceback (most recent call last): ...")
    wrapped.__cause__ = UserInputError("workload.params: 'hiddn' is not a parameter\nmore")
    recorder.after_exception(None, {0: RuntimeError("rank 0 lost its peer"), 1: wrapped})
    assert events == [ControllerStarted("the controller"),
                      UserErrorEvent("workload.params: 'hiddn' is not a parameter")]


def test_a_fault_is_not_a_user_error_and_is_left_to_ray_to_retry(tmp_path, events):
    """The driver is told which worker failed and how (it says so, and that Ray restarts),
    never that it must stop the run."""
    recorder = RunRecorder(str(tmp_path), "none", events)
    recorder.after_exception(None, {1: OSError("disk"), 0: RuntimeError("worker died\nmore")})
    assert events == [ControllerStarted("the controller"),
                      WorkerFailed("worker 0: RuntimeError: worker died")]
    assert not (tmp_path / HISTORY_FILE).exists() and not (tmp_path / HISTORY_SEGMENTS_DIR).exists()


def test_a_step_saved_after_a_signal_is_news_for_the_driver_not_a_record(tmp_path, events):
    """The workers saved the step in flight, as the driver asked (``workers.loop.preempt``):
    the driver is told where; the history and W&B never see it."""
    recorder = RunRecorder(str(tmp_path), "best", events)
    saved = tmp_path / "checkpoint_step00000007_preempt"
    recorder.after_report(None, [{"epoch": 2, "global_step": 7, PREEMPT_KEY: 1.0}] * 2,
                          SimpleNamespace(path=str(saved)))
    assert events == [Preempted(str(saved))]
    assert read_history(str(tmp_path)) == []


def test_the_events_module_imports_neither_torch_nor_ray():
    """Both processes import it to unpickle the events; the driver's imports stay light."""
    code = ("import sys, orchestrator.training.events\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"
