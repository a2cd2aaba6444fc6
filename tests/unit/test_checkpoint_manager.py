"""The end of an epoch on one rank (``CheckpointManager.report``): what is saved, with which
metadata, what Ray is told, and when the run stops.

One rank, no process group (``broadcast_flags`` is then the identity), a real model and
optimizer; the fakes are the saver (it writes each snapshot at once with the project's own
``write_checkpoint``, as Ray's upload thread would) and ``ray.train.report``.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.fs as pafs
import pytest
import torch

import workers.checkpoint.manager as manager_module
from workers.checkpoint.load import load_metadata, load_train_state, load_weights
from workers.checkpoint.manager import CheckpointManager, Position, also_trackers
from workers.checkpoint.snapshot import HostBuffers, Snapshot
from workers.checkpoint.writer import write_checkpoint
from workers.contract.config import RunConfig
from workers.contract.names import CHECKPOINT_PREFIX, PREEMPT_KEY, RANK_KEY
from workers.decisions.tracker import tracker_of
from workers.evaluation.metrics import MeanLoss
from workers.loop.sharding import LocalState

NAN = float("nan")


class WritingSaver:
    """``AsyncSaver``'s interface; each save is written before ``report`` returns (so
    reusing the host buffers for the next snapshot is safe, as after the real ``wait``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.buffers = HostBuffers()
        self.saves: list[tuple[dict[str, Any], Path]] = []  # (reported metrics, directory)

    def wait(self) -> None:
        pass

    def report(self, metrics: dict[str, Any], snap: Snapshot, dir_name: str) -> None:
        path = self.directory / dir_name
        write_checkpoint(snap, pafs.LocalFileSystem(), str(path))
        self.saves.append((dict(metrics), path))


class Epochs:
    """Drives a manager through epochs with given monitored values (``val_loss``)."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, epochs: int,
                 torch_weights_file: str | None = None, **sections: Any) -> None:
        self.cfg = RunConfig.model_validate({
            "name": "checkpoints", "storage_path": str(tmp_path),
            "workload": {"entrypoint": "tests.workloads.overfit:build"},
            "train": {"epochs": epochs}, "tracker": {"monitor": "val_loss"}, **sections})
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 2)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.saver = WritingSaver(tmp_path)
        self.manager = CheckpointManager(
            self.cfg, True, tracker_of(self.cfg),
            self.saver, LocalState(self.model, self.optimizer), torch.device("cpu"), 1,
            torch_weights_file, also=also_trackers(self.cfg, None))
        self.plain: list[dict[str, Any]] = []  # reports without a checkpoint
        # What ray.train.report calls (workers.compat.train_fn_utils): Ray Train's utilities.
        monkeypatch.setattr(manager_module, "train_fn_utils",
                            lambda: SimpleNamespace(report=self._plain_report))
        self.weights: dict[int, dict[str, torch.Tensor]] = {}  # each epoch's, as trained

    def _plain_report(self, metrics: dict[str, Any], **kwargs: Any) -> None:
        assert not kwargs, kwargs  # no checkpoint travels this way
        self.plain.append(dict(metrics))

    def run(self, val_losses: list[float],
            val_accuracies: list[float] | None = None) -> list[bool]:
        """One call per epoch, as the loop makes them; returns each epoch's stop verdict."""
        stops = []
        accuracies = val_accuracies or [0.25] * len(val_losses)
        for epoch, (val_loss, accuracy) in enumerate(zip(val_losses, accuracies, strict=True),
                                                     start=1):
            self._train_a_step()
            self.weights[epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}
            values = {"train_loss": 0.5 / epoch, "val_loss": val_loss, "val_accuracy": accuracy}
            stops.append(self.manager.report(epoch, values, started=0.0))
        self.manager.finish()
        return stops

    def _train_a_step(self) -> None:
        self.optimizer.zero_grad()
        self.model(torch.ones(4, 3)).pow(2).sum().backward()
        self.optimizer.step()

    def saved(self) -> list[int]:
        return [load_metadata(path)["epoch"] for _, path in self.saver.saves]

    def reported(self) -> list[int]:
        """Every epoch Ray heard of, in order (one report each, with or without a model)."""
        return sorted([m["epoch"] for m in self.plain] + [m["epoch"] for m, _ in self.saver.saves])


@pytest.fixture
def epochs(tmp_path, monkeypatch):
    return lambda n, **kw: Epochs(tmp_path, monkeypatch, n, **kw)


def test_each_improvement_is_saved_once_with_that_epochs_metrics_and_weights(epochs):
    run = epochs(5)
    assert run.run([1.0, 0.8, 0.9, 0.7, 0.75]) == [False] * 5
    assert run.saved() == [1, 2, 4]  # the first finite value is an improvement
    assert run.reported() == [1, 2, 3, 4, 5]
    for reported, path in run.saver.saves:
        metadata, epoch = load_metadata(path), reported["epoch"]
        assert path.name.startswith(f"{CHECKPOINT_PREFIX}epoch{epoch:04d}_")
        assert metadata["val_loss"] == reported["val_loss"] == [1.0, 0.8, 0.9, 0.7][epoch - 1]
        assert metadata["train_loss"] == 0.5 / epoch and metadata["val_accuracy"] == 0.25
        assert metadata["is_best"] is True and metadata["saved_because"] == "best"
        assert metadata["monitor"] == "val_loss" and metadata["mode"] == "min"
        assert metadata["test_split"] is True  # the manager's default; create() is told it
        assert reported["is_best"] is True
        # The weights of that epoch, not of a later one (the host buffers are reused).
        saved = load_weights(path)
        for name, tensor in run.weights[epoch].items():
            assert torch.equal(saved[name], tensor), (epoch, name)
        state = load_train_state(path)
        assert state["epoch"] == epoch and state["tracker"]["best_epoch"] == epoch
        assert "optimizer" not in state  # a model checkpoint, not a resume one
    assert [m["is_best"] for m in run.plain] == [False, False]
    # Ray keeps one checkpoint by this score: each improvement outranks all before it.
    assert [m[RANK_KEY] for m, _ in run.saver.saves] == [1, 2, 3]


def test_nan_never_saves_and_stops_the_run(epochs):
    run = epochs(4)
    assert run.run([1.0, NAN]) == [False, True]  # train.stop_on_nonfinite (the default)
    assert run.saved() == [1]
    assert math.isnan(run.plain[0]["val_loss"]) and run.plain[0]["is_best"] is False


def test_nan_never_becomes_the_best_when_the_run_goes_on(epochs):
    run = epochs(4, train={"epochs": 4, "stop_on_nonfinite": False})
    assert run.run([NAN, 2.0, NAN, 1.0]) == [False] * 4
    assert run.saved() == [2, 4]
    assert run.reported() == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("checkpoint", "expected_saved", "expected_because"),
    [
        ({"policy": "every_n", "every_n_epochs": 2}, [2, 4], ["every_n", "every_n"]),
        ({"policy": "last"}, [5], ["last"]),
        ({"policy": "all"}, [1, 2, 3, 4, 5], ["all"] * 5),
        ({"policy": "none"}, [], []),
    ],
)
def test_other_policies_save_what_they_promise(epochs, checkpoint, expected_saved,
                                               expected_because):
    run = epochs(5, checkpoint=checkpoint)
    losses = [1.0, 0.8, 0.9, 0.7, 0.75]
    run.run(losses)
    assert run.saved() == expected_saved
    assert run.reported() == [1, 2, 3, 4, 5]
    improved = {1, 2, 4}
    for epoch, because, (_, path) in zip(expected_saved, expected_because, run.saver.saves,
                                         strict=True):
        metadata = load_metadata(path)
        assert metadata["epoch"] == epoch and metadata["saved_because"] == because
        # is_best says whether this epoch improved, whatever made the policy save it.
        assert metadata["is_best"] is (epoch in improved)
        assert metadata["val_loss"] == losses[epoch - 1]


def test_patience_stops_after_that_many_epochs_without_improvement_and_last_saves_there(epochs):
    run = epochs(10, tracker={"monitor": "val_loss", "patience": 2},
                 checkpoint={"policy": "last"})
    assert run.run([1.0, 0.9, 0.95, 0.91]) == [False, False, False, True]
    assert run.saved() == [4]  # the early stop is the last epoch
    assert load_metadata(run.saver.saves[0][1])["is_best"] is False


def test_min_delta_counts_for_patience_only_every_strict_gain_is_saved(epochs):
    run = epochs(3, tracker={"monitor": "val_loss", "min_delta": 0.1, "patience": 2})
    # 0.95 and 0.92 are new bests (saved) but no progress by more than 0.1 from 1.0: stop.
    assert run.run([1.0, 0.95, 0.92]) == [False, False, True]
    assert run.saved() == [1, 2, 3]


def test_resume_checkpoints_hold_the_optimizer_and_are_never_marked_best(epochs):
    run = epochs(4, checkpoint={"policy": "best", "resume_every_n_epochs": 2},
                 torch_weights_file="learner.pth")
    run.run([1.0, 1.1, 0.9, 1.2])
    assert run.saved() == [1, 2, 3, 4]
    by_epoch = {load_metadata(p)["epoch"]: (m, p) for m, p in run.saver.saves}
    for epoch in (2, 4):  # resume only: not improvements
        reported, path = by_epoch[epoch]
        metadata = load_metadata(path)
        assert metadata["is_best"] is False and metadata["saved_because"] == "resume"
        assert reported["is_best"] is False
        assert "optimizer" in load_train_state(path)
        assert not (path / "learner.pth").exists()  # the engine's best-model file: not here
    for epoch in (1, 3):
        metadata = load_metadata(by_epoch[epoch][1])
        assert metadata["is_best"] is True and metadata["saved_because"] == "best"
        assert (by_epoch[epoch][1] / "learner.pth").is_file()
    # Ray's score: a resume checkpoint ranks below the best before it, so keeping one by
    # score never keeps it in place of the best model.
    ranks = {epoch: by_epoch[epoch][0][RANK_KEY] for epoch in by_epoch}
    assert ranks[2] < ranks[1] < ranks[3] and ranks[4] < ranks[3]


def test_every_model_policy_best_keeps_carries_the_engines_weights_file(epochs):
    """fastai's ``learner.pth`` (docs/fastai.md: what ``learn.load`` reads) is in each model
    a user may load: the best, each of the K best and each also-monitor's best; never in a
    resume checkpoint."""
    run = epochs(5, checkpoint={"policy": "best", "keep_top_k": 3, "resume_every_n_epochs": 5},
                 tracker={"monitor": "val_loss",
                          "also_monitor": [{"monitor": "val_accuracy", "mode": "max"}]},
                 torch_weights_file="learner.pth")
    # Epoch 3 enters the 3 best as rank 2 (not the best); epoch 5 is val_accuracy's best
    # only; epoch 5 is also the resume checkpoint's epoch.
    run.run([1.0, 0.8, 0.9, 1.5, 2.0], [0.1, 0.2, 0.15, 0.1, 0.9])
    saved = {}
    for _, path in run.saver.saves:
        metadata = load_metadata(path)
        saved.setdefault(metadata["epoch"], []).append((metadata, path))
    assert sorted(saved) == [1, 2, 3, 5]
    assert saved[3][0][0]["top_k_rank"] == 2 and saved[3][0][0]["is_best"] is False
    for epoch in (1, 2, 3):
        assert (saved[epoch][0][1] / "learner.pth").is_file(), epoch
    [(metadata, path)] = saved[5]
    assert metadata["best_for"] == ["val_accuracy"] and (path / "learner.pth").is_file()


def test_a_smoothed_decision_saves_that_evaluations_weights_and_records_both(epochs):
    run = epochs(4, tracker={"monitor": "val_loss", "smoothing": {"window": 2},
                             "stop_at": 0.5})
    # Smoothed: 1.0, 0.9, 0.6, 0.45 -> the last beats stop_at: one line says why.
    assert run.run([1.0, 0.8, 0.4, 0.5]) == [False, False, False, True]
    assert run.saved() == [1, 2, 3, 4]
    last_reported, path = run.saver.saves[-1]
    metadata = load_metadata(path)
    assert metadata["val_loss"] == 0.5 and metadata["val_loss_smoothed"] == pytest.approx(0.45)
    assert last_reported["stop_reason"] == "tracker.stop_at: val_loss (smoothed) 0.45 reached 0.5"
    for epoch, (_, saved_path) in enumerate(run.saver.saves, 1):
        assert torch.equal(load_weights(saved_path)["weight"], run.weights[epoch]["weight"])


def test_a_preemption_saves_the_full_state_of_its_step_and_never_as_the_best(epochs):
    run = epochs(4, checkpoint={"policy": "best"})
    run.run([1.0, 0.8])  # two improvements
    running = MeanLoss()
    running.add_batch(0.25, 4)
    run.manager.preempt(3, Position(step=5, global_step=25, consumed=40, evaluation=3),
                        running)
    run.manager.finish()
    reported, path = run.saver.saves[-1]
    assert path.name.startswith(f"{CHECKPOINT_PREFIX}step{25:08d}_preempt_")
    assert reported == {"epoch": 3, "step": 5, "global_step": 25, PREEMPT_KEY: 1, "workers": 1,
                        RANK_KEY: 1.5}  # below the best's 2: Ray never keeps it as the best
    metadata = load_metadata(path)
    assert {k: metadata[k] for k in ("epoch", "step", "global_step", "is_best",
                                     "saved_because", "world_size", "workers")} == {
        "epoch": 3, "step": 5, "global_step": 25, "is_best": False,
        "saved_because": "preempt", "world_size": 1, "workers": 1}
    assert "test_split" not in metadata and "val_loss" not in metadata  # not an evaluation
    state = load_train_state(path)
    assert (state["epoch"], state["step"], state["global_step"], state["consumed"]) == (
        3, 5, 25, 40)
    assert state["running_loss"] == [1.0, 4.0] and "optimizer" in state
    assert state["tracker"]["best_epoch"] == 2
    assert not (path / "learner.pth").exists()
