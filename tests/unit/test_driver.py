"""The driver's loop (``training.driver.train_and_record``) against a scripted Ray
(``tests/unit/fake_ray_train.py``): each way a run goes or stops, as the user sees it (the
lines printed, the error and its exit code, summary.json). No Ray runs; the real runs that
prove what only Ray can (signals to real processes, real restarts from real checkpoints) are
in ``tests/integration``."""

from __future__ import annotations

import io
import itertools
import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from ray.exceptions import ActorDiedError
from ray.train import WorkerGroupError

from orchestrator.errors import TrainingError, UserError
from orchestrator.start.console import Console
from orchestrator.start.context import RunContext, StartMode
from orchestrator.start.interrupts import SignalGuard
from orchestrator.start.run_dir import SetAside
from orchestrator.tracking.wandb_run import NullRun
from orchestrator.training.driver import ended, train_and_record
from tests.unit.fake_ray_train import (
    CONTROLLER,
    ScriptedRay,
    fails,
    fault,
    hangs,
    node_lost,
    preempted,
    report,
    send,
    stop_requested,
)
from workers.contract.config import RunConfig
from workers.contract.names import FAILURE_LOG, SUMMARY_FILE
from workers.contract.user_errors import UserInputError

EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)  train_loss=")


class Tracking(NullRun):
    """W&B off, remembering what the driver handed it."""

    def __init__(self) -> None:
        self.records: list[int] = []
        self.aborted = False

    def handle(self, record: dict[str, Any], staged_model: str | None) -> None:
        self.records.append(record["epoch"])

    def abort(self) -> None:
        self.aborted = True


class Driver:
    """One ``orchestrator train`` past its start: the context ``start_run`` would leave (a
    plain console, W&B off, the run directory made), the guard ``run_training`` holds."""

    def __init__(self, tmp_path: Path, **sections: Any) -> None:
        config = {"name": "fake", "workload": {"entrypoint": "m:f"},
                  "storage_path": str(tmp_path), "wandb": {"mode": "disabled"},
                  "train": {"epochs": 3}, **sections}
        self.cfg = RunConfig.model_validate(config)
        self.run_dir = tmp_path / "fake"
        self.run_dir.mkdir()
        self.out = io.StringIO()
        self.tracking = Tracking()
        self.replaced: SetAside | None = None
        self.start = StartMode.FRESH

    def run(self, ray: ScriptedRay) -> dict[str, Any]:
        """What ``run_training`` returns or raises."""
        # Each signal counts as the user's next one (none is the same stop delivered twice).
        clock = itertools.count(start=100.0, step=10.0).__next__
        with SignalGuard(keep_record=True, clock=clock) as guard:
            ctx = RunContext(cfg=self.cfg, run_dir=str(self.run_dir), start=self.start,
                             console=Console(self.out), tracking=self.tracking, use_gpu=False,
                             guard=guard, replaced=self.replaced)
            outcome = train_and_record(ctx, ray.ray_train)
        assert ray.channel.closed
        return ended(*outcome)

    @property
    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()

    def epochs_printed(self) -> list[int]:
        return [int(m.group(1)) for line in self.lines if (m := EPOCH_LINE.match(line))]

    def summary(self) -> dict[str, Any]:
        return json.loads((self.run_dir / SUMMARY_FILE).read_text())


@pytest.fixture(autouse=True)
def _controller_handle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorder runs in this process, not in Ray Train's controller actor."""
    monkeypatch.setattr("orchestrator.training.recorder.train_controller_handle",
                        lambda: CONTROLLER)


def test_a_clean_run_prints_every_epoch_and_writes_its_summary(tmp_path):
    driver = Driver(tmp_path)
    ray = ScriptedRay([report(1, 0.9, best=True, saved=True), report(2, 0.5, best=True,
                                                                       saved=True),
                       report(3, 0.7)])
    summary = driver.run(ray)
    assert driver.lines == [
        "epoch 1/3  train_loss=1.0000  val_loss=0.9000  val_accuracy=0.5100  * new best "
        "val_loss  (saved)",
        "epoch 2/3  train_loss=0.5000  val_loss=0.5000  val_accuracy=0.5200  * new best "
        "val_loss  (saved)",
        "epoch 3/3  train_loss=0.3333  val_loss=0.7000  val_accuracy=0.5300"]
    assert driver.tracking.records == [1, 2, 3] and not driver.tracking.aborted
    assert summary == driver.summary()
    assert summary["status"] == "completed" and summary["best_epoch"] == 2
    assert [r["epoch"] for r in summary["history"]] == [1, 2, 3]
    assert summary["best_checkpoint"].startswith(str(driver.run_dir / "checkpoint_epoch0002"))
    # What the driver built its trainer with: the events stream it drains, the stop stream
    # the workers listen on (engine torch, failure.preempt_grace_s > 0).
    assert ray.built["events"] is ray.channel("events")
    assert ray.built["stop_requests"] is ray.channel("stop")
    assert ray.stops == []  # nothing left running to stop


def test_a_worker_failure_is_said_and_so_is_the_restart_from_the_latest_checkpoint(tmp_path):
    driver = Driver(tmp_path, failure={"max_failures": 2})
    ray = ScriptedRay([report(1, 0.9, best=True, saved=True), report(2, 0.95),
                       fault(RuntimeError("worker died\nTraceback ...")),
                       report(2, 0.8, best=True, saved=True), report(3, 0.85)])
    summary = driver.run(ray)
    assert driver.lines[2:4] == [
        "a worker failed (worker 0: RuntimeError: worker died); restarting the workers from "
        "the latest checkpoint (failure 1 of 2)",
        "workers restarted: training again from epoch 2 (the latest checkpoint)"]
    assert driver.epochs_printed() == [1, 2, 2, 3]
    assert summary["status"] == "completed" and summary["best_epoch"] == 2
    assert [(r["epoch"], r["val_loss"]) for r in summary["history"]] == [(1, 0.9), (2, 0.8),
                                                                       (3, 0.85)]


def test_failures_beyond_max_failures_fail_the_run_with_its_log(tmp_path):
    driver = Driver(tmp_path, failure={"max_failures": 1})
    died = RuntimeError("worker died")
    ray = ScriptedRay([report(1, 0.9, best=True, saved=True), fault(died),
                       report(2, 0.95), fault(died),  # the second: Ray gives up
                       fails(WorkerGroupError("worker 0 died", {0: died}))])
    with pytest.raises(TrainingError) as stopped:
        driver.run(ray)
    log = driver.run_dir / FAILURE_LOG
    assert stopped.value.exit_code == 1
    assert str(stopped.value) == (
        f"training failed: RuntimeError: worker died (details: {log}) after epoch 2 of 3; "
        f"best so far: epoch 1, val_loss=0.9 ({driver.summary()['best_checkpoint']})")
    assert [line for line in driver.lines if line.startswith("a worker failed")] == [
        "a worker failed (worker 0: RuntimeError: worker died); restarting the workers from "
        "the latest checkpoint (failure 1 of 1)"]  # the second is not a restart
    assert "worker 0 died" in log.read_text()  # Ray's whole message, not printed
    assert driver.summary()["status"] == "failed" and driver.summary()["test_metrics"] is None
    assert ray.stops == []  # Ray Train stopped by itself


@pytest.mark.parametrize("how", ["event", "fit"])
def test_a_user_error_stops_the_run_at_once_and_leaves_nothing(tmp_path, how):
    """``event``: the controller says so while Ray would retry (the driver stops it);
    ``fit``: ``fit()`` raises it (no retries left)."""
    driver = Driver(tmp_path, failure={"max_failures": -1})
    mistake = RuntimeError("Traceback (most recent call last): ...")
    mistake.__cause__ = UserInputError("tracker.monitor: 'val_f1' is not reported\nmore")
    script = [report(1, 0.9, best=True, saved=True)]
    script += ([fault(mistake), hangs()] if how == "event"
               else [fails(WorkerGroupError("...", {0: mistake}))])
    ray = ScriptedRay(script)
    with pytest.raises(UserError) as error:  # exit 2
        driver.run(ray)
    assert str(error.value) == "tracker.monitor: 'val_f1' is not reported"
    assert not driver.run_dir.exists()  # a fresh run: nothing of it stays
    assert driver.tracking.aborted
    assert ray.stops == ([CONTROLLER] if how == "event" else [])


def test_a_user_error_brings_back_the_run_overwrite_was_to_replace(tmp_path):
    driver = Driver(tmp_path)
    (driver.run_dir / "summary.json").write_text('{"the": "old run"}')
    driver.replaced, driver.start = SetAside(str(driver.run_dir)), StartMode.OVERWRITE
    driver.run_dir.mkdir()  # the new run's
    mistake = UserInputError("workload.collate_fn: failed on the first batch")
    ray = ScriptedRay([fails(WorkerGroupError("...", {1: mistake}))])
    with pytest.raises(UserError):
        driver.run(ray)
    assert (driver.run_dir / "summary.json").read_text() == '{"the": "old run"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake"]  # nothing left aside


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_step_in_flight_then_stops(tmp_path, signum):
    driver = Driver(tmp_path, failure={"preempt_grace_s": 30},
                    train={"epochs": 3, "eval_every_n_steps": 2})
    name = signal.Signals(signum).name
    ray = ScriptedRay([report(1, 0.9, best=True, saved=True, step=2, global_step=2),
                       send(signum), stop_requested(), preempted(epoch=1, step=3)])
    with pytest.raises(TrainingError) as stopped:
        driver.run(ray)
    assert driver.lines[1:] == [
        f"{name}: saving the step in flight, then stopping (up to 30 s, "
        "failure.preempt_grace_s; send it again to stop now)",
        "the step in flight is saved: --resume goes on at the next one"]
    assert stopped.value.exit_code == 128 + signum  # 130, 143
    assert str(stopped.value).startswith(f"interrupted by {name} after epoch 1 of 3 (global "
                                         "step 2); best so far: epoch 1, step 2 (global step "
                                         "2), val_loss=0.9 (")
    assert ray.channel("stop").sent == [name]
    assert driver.summary()["status"] == "interrupted"
    assert ray.stops == []  # the workers returned by themselves


def test_a_signal_after_the_last_epoch_changes_nothing(tmp_path):
    driver = Driver(tmp_path)
    ray = ScriptedRay([report(1, 0.9, best=True), report(2, 0.8, best=True),
                       report(3, 0.7, best=True), send(signal.SIGTERM), stop_requested()])
    summary = driver.run(ray)  # no error: the run completed
    assert driver.lines[-1] == "the run had ended by itself: nothing left to save"
    assert summary["status"] == "completed" and driver.epochs_printed() == [1, 2, 3]


def test_a_second_signal_in_the_grace_period_stops_now_and_keeps_the_record(tmp_path):
    driver = Driver(tmp_path)
    ray = ScriptedRay([report(1, 0.9, best=True, saved=True), send(signal.SIGINT),
                       stop_requested(), send(signal.SIGINT), hangs()])
    with pytest.raises(TrainingError) as stopped:
        driver.run(ray)
    assert driver.lines[-1] == "SIGINT again: stopping now, without the step in flight"
    assert stopped.value.exit_code == 130
    assert str(stopped.value).startswith("interrupted by SIGINT after epoch 1 of 3")
    assert ray.stops == [CONTROLLER]  # the workers and the controller are stopped
    assert driver.summary()["status"] == "interrupted"


def test_without_a_grace_period_a_signal_stops_the_workers_at_once(tmp_path):
    driver = Driver(tmp_path, failure={"preempt_grace_s": 0})
    ray = ScriptedRay([report(1, 0.9, best=True, saved=True), send(signal.SIGTERM), hangs()])
    with pytest.raises(TrainingError) as stopped:
        driver.run(ray)
    assert stopped.value.exit_code == 143 and driver.epochs_printed() == [1]
    assert ray.built["stop_requests"] is None and ray.stops == [CONTROLLER]
    assert driver.summary()["status"] == "interrupted"


def test_an_elastic_run_says_when_the_cluster_changed(tmp_path):
    driver = Driver(tmp_path, scaling={"num_workers": [1, 2]}, failure={"max_failures": 1})
    ray = ScriptedRay([report(1, 0.9, best=True, saved=True),
                       fault(ActorDiedError(), rank=1),  # its node lost
                       report(2, 0.8, best=True, workers=1), report(3, 0.7, workers=1)])
    summary = driver.run(ray)
    assert driver.lines[1:4] == [
        "a worker failed (worker 1: ActorDiedError: The actor died unexpectedly before "
        "finishing this task.); restarting the workers from the latest checkpoint "
        "(failure 1 of 1)",
        "workers restarted: training again from epoch 2 (the latest checkpoint)",
        "the cluster changed: epoch 2 trained on 1 worker (was 2), from the latest "
        "checkpoint"]
    assert [r["workers"] for r in summary["history"]] == [2, 1, 1]


def test_the_trackers_stop_reason_is_said_and_recorded(tmp_path):
    driver = Driver(tmp_path)
    reason = "patience: no improvement of val_loss for 1 epoch"
    ray = ScriptedRay([report(1, 0.9, best=True), report(2, 0.95, stop_reason=reason)])
    summary = driver.run(ray)
    assert driver.lines[-1] == f"stopping early: {reason}"
    assert summary["status"] == "stopped_early" and summary["stop_reason"] == reason


def test_a_diverged_epoch_is_said_and_recorded(tmp_path):
    driver = Driver(tmp_path)
    nan = float("nan")
    ray = ScriptedRay([report(1, 0.9, best=True), report(2, nan, train_loss=nan)])
    summary = driver.run(ray)
    assert driver.lines[-1] == ("epoch 2: train_loss, val_loss not finite; the run stops here "
                                "(train.stop_on_nonfinite) and keeps its best so far")
    assert summary["status"] == "stopped_early" and summary["best_epoch"] == 1
    assert summary["nonfinite"] == ["train_loss", "val_loss"]


def test_the_controller_dying_fails_the_run(tmp_path):
    driver = Driver(tmp_path)
    ray = ScriptedRay([report(1, 0.9, best=True), fails(ActorDiedError())])
    with pytest.raises(TrainingError) as stopped:
        driver.run(ray)
    assert stopped.value.exit_code == 1
    assert str(stopped.value).startswith("the Ray Train controller died (ActorDiedError) "
                                         "after epoch 1 of 3")
    assert driver.summary()["status"] == "failed" and ray.stops == []


def test_workers_lost_for_worker_wait_s_fail_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr("orchestrator.start.watchdog.CHECK_EVERY_S", 0.05)
    driver = Driver(tmp_path, failure={"worker_wait_s": 1})
    ray = ScriptedRay([report(1, 0.9, best=True), node_lost(), hangs()])
    with pytest.raises(TrainingError) as stopped:
        driver.run(ray)
    waiting = [line for line in driver.lines if line.startswith("waiting since ")]
    assert len(waiting) == 1 and waiting[0].endswith(
        " for room for the workers (2 CPU); the cluster has 0 CPU now; the run stops after "
        "failure.worker_wait_s=1 s")
    assert stopped.value.exit_code == 1
    assert str(stopped.value).startswith(
        "the cluster had no room for the run's workers (2 CPU needed, 0 CPU there; a node "
        "lost?) for failure.worker_wait_s=1 s after epoch 1 of 3")
    assert ray.stops == [CONTROLLER]  # Ray Train would wait on: stopped
    assert driver.summary()["status"] == "failed"
