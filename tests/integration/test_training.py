"""Real 2-worker Ray Train runs: the best model, the policies, restarts and resumes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.errors import UserError
from orchestrator.results.summary import summarize
from orchestrator.start.console import Console
from orchestrator.training.driver import run_training
from tests.integration.conftest import REPO, assert_close, checkpoint_dirs, overfit_config
from workers.checkpoint.load import load_metadata, load_train_state, load_weights
from workers.loop.scoring import evaluate_split

pytestmark = pytest.mark.integration


# BatchNorm (buffers each rank updates on its own) and dropout (random per rank and epoch).
NORM_DROPOUT = {"norm": True, "dropout": 0.2}


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, ray_local):
    """One 10-epoch run with its test split, checked by the tests that only read it (or a
    copy of its directory): a Ray Train run costs far more to start than to train."""
    cfg = overfit_config(tmp_path_factory.mktemp("best"), test_split=True,
                         workload={"params": dict(NORM_DROPOUT)})
    return cfg, run_training(cfg)


def test_saved_model_is_the_best_epochs(best_run):
    """A model with buffers (BatchNorm) and dropout: after an epoch each rank's BatchNorm
    statistics come from its own last batch; the metrics recorded must still be those of the
    weights and buffers rank 0 saved."""
    cfg, summary = best_run
    run_dir = Path(summary["run_dir"])

    history = summary["history"]
    assert [h["epoch"] for h in history] == list(range(1, 11))
    losses = [h["val_loss"] for h in history]
    best_epoch = losses.index(min(losses)) + 1
    # The workload must really improve, then worsen, or this test proves nothing.
    assert 1 < best_epoch < 10 and losses[-1] > min(losses), losses
    assert sum(h["is_best"] for h in history) >= 2  # more than one improvement
    assert summary["best_epoch"] == best_epoch
    assert summary["best_metrics"]["val_loss"] == min(losses)
    # The records the controller wrote in segments, compacted into history.json at the end.
    assert json.loads((run_dir / "history.json").read_text())["history"] == history
    assert not (run_dir / "history").exists()

    # Saved once per improvement, and only then; storage keeps at most best + latest.
    saved = [h["epoch"] for h in history if h["checkpoint"]]
    improved = [h["epoch"] for h in history if h["is_best"]]
    assert saved == improved and best_epoch in saved
    kept = checkpoint_dirs(run_dir)
    assert 1 <= len(kept) <= 2
    best_dir = Path(summary["best_checkpoint"])
    assert best_dir in kept

    metadata = load_metadata(best_dir)
    assert metadata["epoch"] == best_epoch and metadata["is_best"] is True
    assert metadata["monitor"] == "val_loss" and metadata["mode"] == "min"
    assert metadata["seed"] == 0 and metadata["config"]["name"] == cfg.name
    for key, value in summary["best_metrics"].items():
        if key != "is_best" and not key.endswith("_seconds"):  # timings are not the model's
            assert metadata[key] == value, key
    # What saving cost the loop is reported on the epochs that saved.
    best = summary["best_metrics"]
    assert best["save_blocked_seconds"] >= best["snapshot_seconds"] > 0
    state = load_train_state(best_dir)  # weights_only=True: no code runs on load
    assert state["epoch"] == best_epoch and state["tracker"]["best_epoch"] == best_epoch
    assert any("running_mean" in k for k in load_weights(best_dir))

    # The weights and buffers on disk reproduce the recorded metrics in a plain single
    # process, on the whole (odd-sized) validation and test sets; the test split was
    # evaluated once, with the best weights.
    for key, value in evaluate_split(cfg, best_dir, "val").items():
        assert_close(value, summary["best_metrics"][key])
    for key, value in evaluate_split(cfg, best_dir, "test").items():
        assert_close(value, summary["test_metrics"][key])
    assert json.loads((run_dir / "summary.json").read_text())["best_epoch"] == best_epoch


@pytest.mark.parametrize(
    ("policy", "extra", "expected_saved"),
    [
        ("every_n", {"every_n_epochs": 2}, [2, 4]),
        ("last", {}, [4]),  # "all": test_a_damaged_latest_checkpoint_is_skipped_on_resume
        ("none", {}, []),
    ],
)
def test_other_policies_write_what_they_promise(tmp_path, ray_local, policy, extra, expected_saved):
    cfg = overfit_config(tmp_path, name=policy, test_split=True, train={"epochs": 4},
                         checkpoint={"policy": policy, **extra})
    summary = run_training(cfg)
    run_dir = Path(summary["run_dir"])
    assert [h["epoch"] for h in summary["history"] if h["checkpoint"]] == expected_saved
    kept = checkpoint_dirs(run_dir)
    assert [load_metadata(d)["epoch"] for d in kept] == expected_saved
    for directory in kept:
        assert {p.name for p in directory.iterdir()} == {
            "model.safetensors", "metadata.json", "train_state.pt"
        }
    best_epoch = summary["best_epoch"]
    if best_epoch in expected_saved:
        assert load_metadata(summary["best_checkpoint"])["epoch"] == best_epoch
        assert summary["test_metrics"] is not None
    else:
        # Never the last weights in place of the best: no best model, no test metrics.
        assert summary["best_checkpoint"] is None and summary["test_metrics"] is None


def test_workers_killed_mid_epoch_and_mid_write_restart_with_the_same_best(tmp_path,
                                                                          best_run):
    # The reference: the shared undisturbed run's first 8 epochs (the schedule is constant
    # and each epoch seeded: what an 8-epoch run trains), with its BatchNorm and dropout.
    reference = best_run[1]["history"][:8]
    losses = [h["val_loss"] for h in reference]

    marker = tmp_path / "killed-once"
    # 16 samples per rank, batch 8: 2 steps an epoch; the 8th step is in epoch 4, where a
    # worker SIGKILLs itself; then rank 0 SIGKILLs itself writing epoch 6's model file,
    # between its temporary file and the rename.
    cfg = overfit_config(
        tmp_path, name="restarted", failure={"max_failures": 2}, train={"epochs": 8},
        checkpoint={"resume_every_n_epochs": 1},
        workload={"params": {**NORM_DROPOUT, "fail_after_steps": 7,
                             "fail_with": "sigkill", "kill_writing_epoch": 6,
                             "marker": str(marker)}},
    )
    summary = run_training(cfg)
    assert marker.exists() and Path(f"{marker}.write").exists(), "a kill did not happen"

    # Restored from the latest checkpoint each time, with the tracker's memory of the best:
    # the run ends exactly where the uninterrupted one does.
    assert summary["best_epoch"] == losses.index(min(losses)) + 1
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 9))
    for got, ref in zip(summary["history"], reference, strict=True):
        assert_close(got["val_loss"], ref["val_loss"], rel=1e-5)
        assert got["is_best"] == ref["is_best"]
    best_dir = Path(summary["best_checkpoint"])
    assert load_metadata(best_dir)["epoch"] == summary["best_epoch"]
    run_dir = Path(summary["run_dir"])
    kept = checkpoint_dirs(run_dir)
    assert len(kept) == 2 and best_dir in kept  # the best and the latest (epoch 8)
    assert load_metadata(kept[-1])["epoch"] == 8
    # The half-written epoch 6 left nothing behind: no directory, no temporary file.
    leftovers = [p for d in run_dir.glob("checkpoint_*") for p in d.rglob(".*")]
    assert leftovers == [], leftovers


def test_rerun_is_explicit_and_resume_continues(tmp_path, ray_local):
    first = run_training(overfit_config(tmp_path, name="again", train={"epochs": 3}))
    with pytest.raises(UserError, match="--resume.*--overwrite"):
        run_training(overfit_config(tmp_path, name="again", train={"epochs": 3}))

    resumed = run_training(overfit_config(tmp_path, name="again", train={"epochs": 6}),
                           resume=True)
    assert resumed["start"] == "resume"
    assert [h["epoch"] for h in resumed["history"]] == list(range(1, 7))
    assert resumed["history"][:3] == first["history"]
    losses = [h["val_loss"] for h in resumed["history"]]
    assert resumed["best_epoch"] == losses.index(min(losses)) + 1

    fresh = run_training(overfit_config(tmp_path, name="again", train={"epochs": 2}),
                         overwrite=True)
    assert fresh["start"] == "overwrite"
    assert [h["epoch"] for h in fresh["history"]] == [1, 2]


def test_a_user_error_is_never_retried_even_with_unlimited_failures(tmp_path):
    """failure.max_failures: -1 retries faults forever; a mistake in the config is no fault."""
    cfg = overfit_config(tmp_path, name="bad-monitor", tracker={"monitor": "val_auc"},
                         failure={"max_failures": -1})
    (tmp_path / "run.yaml").write_text(json.dumps(cfg.to_dict()))
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "train", "run.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    # One line, before any epoch, without Ray's output around it: the run's own two start
    # lines, then the error.
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: tracker.monitor: 'val_auc' is not reported by this "
                                  "run; it reports: train_loss, val_accuracy, val_loss, val_mcc")
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["Starting", "2"]
    assert not (tmp_path / "runs" / "bad-monitor").exists()


def test_breast_cancer_monitors_mcc(tmp_path, ray_local):
    from workers.contract.config import RunConfig

    cfg = RunConfig.model_validate({
        "name": "bc", "storage_path": str(tmp_path / "runs"),
        "workload": {"entrypoint": "workers.workloads.breast_cancer:build"},
        "train": {"epochs": 4, "batch_size": 32}, "tracker": {"monitor": "val_mcc"},
        "wandb": {"mode": "disabled"},
    })
    summary = run_training(cfg)
    assert summary["mode"] == "max"
    mccs = [h["val_mcc"] for h in summary["history"]]
    assert summary["best_metrics"]["val_mcc"] == max(mccs)
    recomputed = evaluate_split(cfg, summary["best_checkpoint"], "val")
    assert_close(recomputed["val_mcc"], max(mccs))


def test_bf16_mixed_precision_tracks_and_saves_float32_weights(tmp_path, ray_local):
    from safetensors import safe_open

    cfg = overfit_config(tmp_path, name="bf16", train={"epochs": 6, "precision": "bf16"})
    summary = run_training(cfg)
    losses = [h["val_loss"] for h in summary["history"]]
    assert len(losses) == 6 and summary["best_metrics"]["val_loss"] == min(losses)
    best_dir = Path(summary["best_checkpoint"])
    assert load_metadata(best_dir)["config"]["train"]["precision"] == "bf16"
    with safe_open(str(best_dir / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float32}
    # The recorded metrics are those of a bf16 evaluation of the saved weights (measured: equal
    # to ~1e-8) ...
    recomputed = evaluate_split(cfg, best_dir, "val")
    for key, value in recomputed.items():
        assert_close(value, summary["best_metrics"][key])
    # ... and not of a float32 one (measured: ~3e-5 apart): the run computed in bfloat16.
    fp32 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": "fp32"})})
    assert evaluate_split(fp32, best_dir, "val")["val_loss"] != pytest.approx(
        summary["best_metrics"]["val_loss"], rel=1e-6)


def test_processes_of_a_local_run_query_their_own_clusters_state(ray_local):
    """Ray Train's placement-group cleaner (a detached actor started by the controller) asks
    the state API whether the controller died. Each process must ask this run's cluster, not
    the newest one started on the machine (/tmp/ray/ray_current_cluster)."""
    import ray
    from ray.dashboard.utils import get_address_for_submission_client

    @ray.remote(num_cpus=0)
    class Probe:
        def ask(self) -> tuple[str | None, str]:
            import os

            return os.environ.get("RAY_API_SERVER_ADDRESS"), \
                get_address_for_submission_client(None)

    @ray.remote(num_cpus=0)
    def from_a_detached_actor_started_by_a_task(name: str) -> tuple[str | None, str]:
        probe = Probe.options(name=name, lifetime="detached").remote()
        try:
            return ray.get(probe.ask.remote())
        finally:
            ray.kill(probe)

    own = "http://" + ray._private.worker.get_dashboard_url()
    assert ray.get(from_a_detached_actor_started_by_a_task.remote("state-probe")) == (own, own)


def test_a_damaged_latest_checkpoint_is_skipped_on_resume(tmp_path, ray_local):
    common = {"checkpoint": {"policy": "all", "resume_every_n_epochs": 1}}
    first = run_training(overfit_config(tmp_path, name="damaged", train={"epochs": 4},
                                        **common))
    run_dir = Path(first["run_dir"])
    # Policy "all": every epoch saved, and kept, each a whole checkpoint.
    assert [h["epoch"] for h in first["history"] if h["checkpoint"]] == [1, 2, 3, 4]
    kept = checkpoint_dirs(run_dir)
    assert [load_metadata(d)["epoch"] for d in kept] == [1, 2, 3, 4]
    for directory in kept:
        assert {p.name for p in directory.iterdir()} == {
            "model.safetensors", "metadata.json", "train_state.pt"}
    assert load_metadata(first["best_checkpoint"])["epoch"] == first["best_epoch"]
    model_file = kept[-1] / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-64])  # a write cut short

    out = io.StringIO()
    resumed = run_training(overfit_config(tmp_path, name="damaged", train={"epochs": 6},
                                          **common), resume=True, console=Console(stream=out))
    warnings = [line for line in out.getvalue().splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{kept[-1].name}/model.safetensors" in warnings[0]
    # Continued from epoch 3, the newest intact checkpoint: epoch 4 was trained again, the
    # same way (resume checkpoints hold the optimizer; seeds are per epoch).
    assert [h["epoch"] for h in resumed["history"]] == list(range(1, 7))
    assert_close(resumed["history"][3]["val_loss"], first["history"][3]["val_loss"], rel=1e-5)

    for directory in checkpoint_dirs(run_dir):  # now every one of them is damaged
        (directory / "model.safetensors").write_bytes(b"not weights")
    history = (run_dir / "history.json").read_bytes()
    with pytest.raises(UserError, match="^--resume: no intact checkpoint") as raised:
        run_training(overfit_config(tmp_path, name="damaged", train={"epochs": 8}, **common),
                     resume=True)
    assert "\n" not in str(raised.value)
    assert (run_dir / "history.json").read_bytes() == history  # nothing touched


def test_a_run_stopped_before_its_last_report_was_recorded_names_its_best(best_run,
                                                                          tmp_path):
    """Ray registers a checkpoint (deleting the one it replaces) before the controller's
    recorder sees that report; a run stopped in between still has its best model named."""
    cfg, summary = best_run
    best, best_name = summary["best_epoch"], Path(summary["best_checkpoint"]).name
    assert best > 1, "a best epoch with no report before it leaves nothing to repair"
    # A copy of the shared run's directory (the records name checkpoints relative to it).
    run_dir = tmp_path / "unrecorded"
    shutil.copytree(summary["run_dir"], run_dir)
    # What such a stop leaves: history.json ends before the best epoch's report, and only the
    # best epoch's checkpoint is in storage (Ray deleted the one it replaced).
    history = json.loads((run_dir / "history.json").read_text())["history"]
    (run_dir / "history.json").write_text(json.dumps(
        {"history": [r for r in history if r["epoch"] < best]}))
    for directory in checkpoint_dirs(run_dir):
        if directory.name != best_name:
            shutil.rmtree(directory)

    again = summarize(cfg, str(run_dir), use_gpu=False, start="resume")
    assert again["best_epoch"] == best
    assert Path(again["best_checkpoint"]) == run_dir / best_name
    assert again["test_metrics"] == pytest.approx(summary["test_metrics"])
    for key in ("val_loss", "val_accuracy", "train_loss"):
        assert again["best_metrics"][key] == summary["best_metrics"][key]
    repaired = json.loads((run_dir / "history.json").read_text())["history"]
    assert [r["epoch"] for r in repaired] == list(range(1, best + 1))


def test_a_diverged_run_stops_and_keeps_its_best(tmp_path, ray_local):
    # 2 steps an epoch: NaN outputs (then NaN weights) from the 7th step, in epoch 4.
    cfg = overfit_config(tmp_path, name="diverged", train={"epochs": 8},
                         workload={"params": {"nan_after_steps": 6}})
    out = io.StringIO()
    summary = run_training(cfg, console=Console(stream=out))
    assert summary["epochs_completed"] == 4 and summary["status"] == "stopped_early"
    assert "train_loss" in summary["nonfinite"] and "val_loss" in summary["nonfinite"]
    assert "epoch 4: train_loss" in out.getvalue() and "train.stop_on_nonfinite" in out.getvalue()
    assert 1 <= summary["best_epoch"] <= 3
    weights = load_weights(Path(summary["best_checkpoint"]))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    for key, value in evaluate_split(cfg, Path(summary["best_checkpoint"]), "val").items():
        assert_close(value, summary["best_metrics"][key])
