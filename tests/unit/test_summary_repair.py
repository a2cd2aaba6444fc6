"""A run's summary built from what storage holds, when the history and the checkpoints
disagree (a run stopped between Ray registering a checkpoint and the recorder seeing it; an
upload that completed while its worker group failed). The run directory is made by hand in
the shapes the project writes (``tests.unit.run_files``); the test split's evaluation, a Ray
task, is replaced by a function that names the checkpoint it was given."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchestrator.results import summary as summary_module
from orchestrator.results.summary import remove_unregistered_checkpoints, summarize
from tests.unit.run_files import (
    epoch_metrics,
    history_record,
    read_history_file,
    write_checkpoint_dir,
    write_history,
    write_ray_snapshot,
)
from workers.contract.config import RunConfig
from workers.contract.names import HISTORY_FILE, METADATA_FILE


@pytest.fixture
def run(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "repair"
    run_dir.mkdir(parents=True)
    cfg = RunConfig.model_validate({
        "name": "repair", "storage_path": str(tmp_path / "runs"),
        "workload": {"entrypoint": "tests.workloads.overfit:build"},
        "train": {"epochs": 6}, "tracker": {"monitor": "val_loss"}})
    evaluated: list[str] = []

    def evaluate(cfg, checkpoint_path, use_gpu):
        evaluated.append(checkpoint_path)
        return {"test_loss": 0.25}

    monkeypatch.setattr(summary_module, "evaluate_test_split", evaluate)

    def summary(**kwargs):
        return summarize(cfg, str(run_dir), use_gpu=False, start="new", **kwargs)

    return run_dir, summary, evaluated


def test_a_missing_history_is_rebuilt_from_the_checkpoints_metadata(run):
    run_dir, summary, evaluated = run
    best = write_checkpoint_dir(run_dir, 2, 0.4, is_best=True)
    latest = write_checkpoint_dir(run_dir, 4, 0.6, is_best=False, saved_because="resume")

    out = summary()
    assert [h["epoch"] for h in out["history"]] == [2, 4]
    assert out["history"][0] == {**epoch_metrics(2, 0.4), "is_best": True,
                                 "checkpoint": best.name}
    assert out["history"][1]["checkpoint"] == latest.name
    assert out["best_epoch"] == 2 and out["best_checkpoint"] == str(best)
    assert out["best_metrics"]["val_loss"] == 0.4
    assert evaluated == [str(best)] and out["test_metrics"] == {"test_loss": 0.25}
    assert read_history_file(run_dir) == out["history"]  # written back for the next reader
    # Epochs without a checkpoint cannot be recovered: the run is not called complete.
    assert out["epochs_completed"] == 4 and out["status"] == "stopped_early"


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2]", b'{"history": 3}'])
def test_a_damaged_history_is_rebuilt_from_the_checkpoints_metadata(run, damage):
    run_dir, summary, _ = run
    best = write_checkpoint_dir(run_dir, 2, 0.4, is_best=True)
    (Path(run_dir) / "history.json").write_bytes(damage)

    out = summary()
    assert [h["epoch"] for h in out["history"]] == [2]
    assert out["best_epoch"] == 2 and out["best_checkpoint"] == str(best)
    assert read_history_file(run_dir) == out["history"]  # written back whole


def test_a_history_behind_the_checkpoints_gains_the_missing_epoch_and_its_best(run):
    """Ray registered epoch 4's model (and deleted epoch 2's, the best so far) before the
    recorder saw that report: the newest best is known only from its metadata."""
    run_dir, summary, evaluated = run
    latest_kept = write_checkpoint_dir(run_dir, 3, 0.5, is_best=False, saved_because="resume")
    best = write_checkpoint_dir(run_dir, 4, 0.3, is_best=True)
    history = [history_record(1, 0.6, True), history_record(2, 0.4, True),
               history_record(3, 0.5, False, latest_kept)]
    write_history(run_dir, history)

    out = summary(status="interrupted")
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3, 4]
    assert out["history"][:3] == history  # the records the recorder wrote are kept as they are
    assert out["history"][3]["checkpoint"] == best.name
    assert out["best_epoch"] == 4 and out["best_checkpoint"] == str(best)
    assert out["status"] == "interrupted" and out["test_metrics"] is None and evaluated == []
    assert read_history_file(run_dir) == out["history"]


def test_a_complete_history_is_left_as_it_is(run):
    run_dir, summary, _ = run
    best = write_checkpoint_dir(run_dir, 2, 0.4, is_best=True)
    history = [history_record(1, 0.6, True), history_record(2, 0.4, True, best),
               *(history_record(e, 0.5 + e / 10, False) for e in (3, 4, 5, 6))]
    write_history(run_dir, history)
    before = (run_dir / HISTORY_FILE).stat().st_mtime_ns

    out = summary()
    assert out["history"] == history and out["status"] == "completed"
    assert out["best_epoch"] == 2 and out["best_checkpoint"] == str(best)
    assert (run_dir / HISTORY_FILE).stat().st_mtime_ns == before  # not rewritten


def test_a_checkpoint_whose_metadata_is_damaged_is_neither_best_nor_history(run):
    run_dir, summary, evaluated = run
    best = write_checkpoint_dir(run_dir, 2, 0.4, is_best=True)
    damaged = write_checkpoint_dir(run_dir, 3, 0.2, is_best=True)
    (damaged / METADATA_FILE).write_text('{"epoch": 3, "val_lo')  # cut short
    write_history(run_dir, [history_record(1, 0.6, True), history_record(2, 0.4, True, best)])

    out = summary(status="failed")
    assert [h["epoch"] for h in out["history"]] == [1, 2]
    assert out["best_epoch"] == 2 and out["best_checkpoint"] == str(best)
    assert [c["epoch"] for c in out["checkpoints"]] == [2]


def test_no_ray_task_scores_a_test_split_the_workload_does_not_have(run):
    """The best model's metadata says the workload has no test split (rank 0 knows it from
    the workload it built): the run ends without starting the scoring task for it."""
    run_dir, summary, evaluated = run
    best = write_checkpoint_dir(run_dir, 2, 0.4, is_best=True, test_split=False)
    write_history(run_dir, [history_record(1, 0.6, True), history_record(2, 0.4, True, best)])
    out = summary()
    assert out["best_checkpoint"] == str(best) and out["status"] == "stopped_early"
    assert out["test_metrics"] is None and evaluated == []
    # With one (or a checkpoint from before the metadata said), it is scored.
    shutil.rmtree(best)
    with_test = write_checkpoint_dir(run_dir, 2, 0.4, is_best=True, test_split=True)
    write_history(run_dir, [history_record(1, 0.6, True),
                            history_record(2, 0.4, True, with_test)])
    assert summary()["test_metrics"] == {"test_loss": 0.25} and evaluated == [str(with_test)]


def test_a_best_record_whose_model_is_gone_names_no_checkpoint(run):
    """The policy never kept that epoch's model (``last``): no other model stands in."""
    run_dir, summary, evaluated = run
    last = write_checkpoint_dir(run_dir, 6, 0.9, is_best=False, saved_because="last")
    write_history(run_dir, [history_record(1, 0.3, True),
                            *(history_record(e, 0.5, False) for e in (2, 3, 4, 5)),
                            history_record(6, 0.9, False, last)])
    out = summary()
    assert out["best_epoch"] == 1 and out["best_checkpoint"] is None
    assert out["test_metrics"] is None and evaluated == []


def test_unregistered_checkpoints_are_removed_and_registered_ones_kept(run):
    run_dir, summary, _ = run
    best = write_checkpoint_dir(run_dir, 2, 0.4, is_best=True)
    latest = write_checkpoint_dir(run_dir, 4, 0.6, is_best=False, saved_because="resume")
    # Uploaded while the worker group was failing: Ray never registered it.
    orphan = write_checkpoint_dir(run_dir, 5, 0.7, is_best=False, saved_because="resume")
    # Registered by a report the recorder saw, after Ray's snapshot was last written.
    seen = write_checkpoint_dir(run_dir, 6, 0.35, is_best=True)
    write_ray_snapshot(run_dir, registered=[best], latest=latest)
    write_history(run_dir, [history_record(1, 0.5, True), history_record(2, 0.4, True, best),
                            history_record(3, 0.45, False), history_record(4, 0.6, False, latest),
                            history_record(6, 0.35, True, seen)])
    (run_dir / "wandb_staging").mkdir()  # not a checkpoint directory: never touched

    out = summary(status="interrupted")
    assert not orphan.exists()
    assert all(p.is_dir() for p in (best, latest, seen, run_dir / "wandb_staging"))
    assert [c["epoch"] for c in out["checkpoints"]] == [2, 4, 6]
    # The orphan's epoch is not added to the history from its metadata.
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3, 4, 6]
    assert out["best_epoch"] == 6 and out["best_checkpoint"] == str(seen)


@pytest.mark.parametrize("snapshot", [None, "{not json", json.dumps({"other": 1})])
def test_nothing_is_removed_when_rays_snapshot_cannot_be_read(run, snapshot):
    run_dir, _, _ = run
    checkpoints = [write_checkpoint_dir(run_dir, e, 0.5, is_best=e == 1) for e in (1, 2)]
    if snapshot is not None:
        (run_dir / "checkpoint_manager_snapshot.json").write_text(snapshot)
    assert remove_unregistered_checkpoints(str(run_dir)) == []
    assert all(p.is_dir() for p in checkpoints)


def test_a_checkpoint_named_only_in_rays_latest_result_is_kept(run):
    run_dir, _, _ = run
    best, latest = (write_checkpoint_dir(run_dir, 1, 0.5, is_best=True),
                    write_checkpoint_dir(run_dir, 2, 0.6, is_best=False, saved_because="resume"))
    write_ray_snapshot(run_dir, registered=[best], latest=latest)
    assert remove_unregistered_checkpoints(str(run_dir)) == []
    assert Path(latest).is_dir()


def test_a_resume_first_records_the_epoch_ray_registered_but_the_recorder_missed(run):
    """The driver SIGKILLed after Ray registered epoch 3's checkpoint, before the recorder
    wrote epoch 3: Ray resumes after epoch 3 and deletes its checkpoint once epoch 4's
    replaces it, so the epoch is recorded from its metadata before training resumes."""
    import io

    from orchestrator.start.console import Console
    from orchestrator.start.context import Prepared, StartMode
    from orchestrator.training.driver import check_resume_point

    run_dir, _, _ = run
    best = write_checkpoint_dir(run_dir, 2, 0.4, is_best=True)
    latest = write_checkpoint_dir(run_dir, 3, 0.5, is_best=False, saved_because="resume")
    write_ray_snapshot(run_dir, [best, latest], latest)
    history = [history_record(1, 0.6, True), history_record(2, 0.4, True, best)]
    write_history(run_dir, history)
    cfg = RunConfig.model_validate({
        "name": "repair", "storage_path": str(run_dir.parent),
        "workload": {"entrypoint": "tests.workloads.overfit:build"}})
    prepared = Prepared(cfg=cfg, run_dir=str(run_dir), start=StartMode.RESUME)
    check_resume_point(prepared, Console(io.StringIO()))

    recorded = read_history_file(run_dir)
    assert [h["epoch"] for h in recorded] == [1, 2, 3]
    assert recorded[:2] == history and recorded[2]["checkpoint"] == latest.name
    assert recorded[2]["val_loss"] == 0.5 and recorded[2]["is_best"] is False


def test_a_resumed_searchs_trial_skips_its_damaged_latest_and_says_so(tmp_path):
    """A trial the search continues: its newest checkpoint damaged (half its weights file),
    the trial resumes from the one before, and the search says so in the trial's name (its
    own processes log it where nobody reads). With none intact, exit 2 naming the trial,
    before anything of the search changes."""
    import io

    from orchestrator.errors import UserError
    from orchestrator.search.runner import check_trial_resume_point
    from orchestrator.start.console import Console

    trial_dir = tmp_path / "trials" / "trial-001"
    trial_dir.mkdir(parents=True)
    first = write_checkpoint_dir(trial_dir, 1, 0.5, is_best=True)
    latest = write_checkpoint_dir(trial_dir, 2, 0.4, is_best=True)
    write_ray_snapshot(trial_dir, [first, latest], latest)
    write_history(trial_dir, [history_record(1, 0.5, True, first),
                              history_record(2, 0.4, True, latest)])
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = io.StringIO()
    check_trial_resume_point(str(trial_dir), "trial-001", Console(out))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("[trial-001] warning: damaged checkpoint skipped: ")
    assert latest.name in lines[0]
    assert lines[1] == f"[trial-001] resuming from {first}, the newest intact checkpoint"

    weights = first / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = sorted(p.name for p in trial_dir.iterdir())
    with pytest.raises(UserError, match=r"^\[trial-001\] --resume: no intact checkpoint in "):
        check_trial_resume_point(str(trial_dir), "trial-001", Console(io.StringIO()))
    assert sorted(p.name for p in trial_dir.iterdir()) == before

    # A trial that never started (no directory) has nothing to check.
    check_trial_resume_point(str(tmp_path / "trials" / "trial-002"), "trial-002",
                             Console(io.StringIO()))
