"""Long runs: evaluations every N optimizer steps, checkpoints mid-epoch, exact resumes.

The test workload records, in every process, the indices of the samples each training batch
holds. An undisturbed run is the reference: a worker SIGKILLed mid-epoch (Ray restarts from
the checkpoint of step 8, mid-epoch) and a driver SIGTERMed twice (the step in flight saved
each time), resumed with ``--resume``, give the same sequence of (global step, train loss,
evaluation metrics) to 1e-6; the SIGTERMed run trains each sample exactly once per epoch,
also after its last resume on 3 workers instead of 2 (the rest of the epoch re-sharded)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator.training.driver import run_training
from tests.integration.conftest import REPO, RunProcesses, overfit_config, recorded, wait_for
from workers.contract.config import RunConfig
from workers.loop.scoring import evaluate_split

pytestmark = pytest.mark.integration

# 96 samples, 2 workers, batches of 8: 6 optimizer steps an epoch; evaluations every 4 steps
# and at the last. With train.max_steps 16 the run ends mid-epoch 3, at its best (the loss
# still falls): (epoch, step, global step) of each evaluation.
N, EPOCHS, EVERY, MAX_STEPS = 96, 3, 4, 16
POINTS = [(1, 4, 4), (2, 2, 8), (2, 6, 12), (3, 4, 16)]
COMPARED = ("global_step", "train_loss", "val_loss", "val_accuracy", "val_mcc")


def long_run(tmp_path: Path, name: str, train: dict | None = None, **params) -> dict:
    return {"train": {"epochs": EPOCHS, "batch_size": 8, "lr": 0.01,
                      "eval_every_n_steps": EVERY, **(train or {})},
            "checkpoint": {"resume_every_n_epochs": 1},  # every evaluation: full state
            "workload": {"params": {"n_train": N, "record_samples": str(tmp_path / name),
                                    **params}}}


def trained_samples(directory: Path) -> Counter:
    counts: Counter = Counter()
    for path in directory.glob("*.txt"):
        for line in path.read_text().split("\n"):
            counts.update(int(i) for i in line.split())
    return counts


def assert_same_records(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected), (got, expected)
    for g, e in zip(got, expected, strict=True):
        for key in COMPARED:
            assert g[key] == pytest.approx(e[key], abs=1e-6), (key, g, e)


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, ray_local) -> tuple[dict, Path]:
    """The undisturbed run both tests compare with (its summary, and the directory of the
    samples it trained). It stops at MAX_STEPS, the 4th evaluation: the SIGTERMed run, still
    interrupted, can have no later one (its 5th, at step 18, is its last step), and the
    schedule is constant, so the steps before are the same whatever the run's length."""
    tmp_path = tmp_path_factory.mktemp("undisturbed")
    summary = run_training(overfit_config(
        tmp_path, name="reference", **long_run(tmp_path, "reference",
                                               {"max_steps": MAX_STEPS})))
    return summary, tmp_path / "reference"


def test_evaluations_by_steps_keep_a_mid_epoch_best_and_a_killed_worker_resumes_exactly(
        tmp_path, undisturbed):
    steps = {"max_steps": MAX_STEPS}
    reference, samples = undisturbed
    history = reference["history"]
    assert [(h["epoch"], h["step"], h["global_step"]) for h in history] == POINTS
    assert reference["status"] == "completed" and reference["global_step"] == MAX_STEPS
    # Two whole epochs, then 4 of epoch 3's 6 steps: each sample once per epoch.
    counts = trained_samples(samples)
    assert set(counts.values()) <= {2, 3} and sum(counts.values()) == 2 * N + 4 * 16

    # The best evaluation falls mid-epoch: that step's model is saved, and re-scored in one
    # process it is the record.
    best = reference["best_metrics"]
    assert reference["best_global_step"] == best["global_step"] and best["step"] < 6
    assert Path(reference["best_checkpoint"]).name.startswith(
        f"checkpoint_step{best['global_step']:08d}_")
    cfg = RunConfig.model_validate(reference["config"])
    rescored = evaluate_split(cfg, reference["best_checkpoint"], "val")
    for key in ("val_loss", "val_accuracy", "val_mcc"):
        assert rescored[key] == pytest.approx(best[key], abs=1e-6)
    shown = subprocess.run([sys.executable, "-m", "orchestrator", "best",
                            reference["run_dir"]], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert f"global step {best['global_step']}" in shown.stdout, shown.stdout

    # A worker SIGKILLs itself at its 10th batch (epoch 2, step 4): Ray restarts the workers
    # from step 8's checkpoint, taken mid-epoch, and they go on at the next batch.
    marker = tmp_path / "killed"
    killed = run_training(overfit_config(
        tmp_path, name="killed", failure={"max_failures": 1},
        **long_run(tmp_path, "killed", steps, fail_after_steps=9, fail_with="sigkill",
                   marker=str(marker))))
    assert marker.exists(), "the worker was not killed"
    assert_same_records(killed["history"], history)
    assert killed["best_global_step"] == reference["best_global_step"]


def test_sigterm_saves_the_step_in_flight_and_resumes_train_each_sample_once(tmp_path,
                                                                               ray_tmp,
                                                                               undisturbed):
    def config(name: str, step_seconds: float) -> dict:
        base = overfit_config(tmp_path, name=name, **long_run(
            tmp_path, name, step_seconds=step_seconds)).to_dict()
        return base

    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    run = RunProcesses(marker=ray_tmp)

    def start(name: str, *extra: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "train", f"{name}.yaml",
                                 *extra], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        run.roots.append(proc.pid)
        return proc

    def records(name: str) -> list[dict]:
        return recorded(tmp_path / "runs" / name)

    (tmp_path / "preempted.yaml").write_text(yaml.safe_dump(config("preempted", 0.25)))
    expected = undisturbed[0]["history"]

    def batches() -> int:  # training batches recorded by the workers, every run together
        return sum(p.read_text().count("\n") for p in (tmp_path / "preempted").glob("*.txt"))

    def interrupt(proc: subprocess.Popen, ready: Callable[[], bool], what: str) -> str:
        wait_for(lambda: ready() or proc.poll() is not None, 240, what)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err[-3000:]
        assert "the step in flight is saved" in out, out
        return err.strip().splitlines()[-1]

    line = interrupt(start("preempted"), lambda: len(records("preempted")) >= 1,
                     "the first evaluation")
    assert line.startswith("interrupted by SIGTERM after epoch") and line.endswith(
        "continue with: orchestrator train preempted.yaml --resume"), line
    # Batches the resumed run trains itself (a SIGTERM before the resumed driver is up would
    # find no handler yet), as soon as it trains: under load the first run may have gone on
    # for several evaluations before it stopped, and waiting for a record of the resumed run
    # let it finish first once.
    trained = batches()
    interrupt(start("preempted", "--resume"), lambda: batches() >= trained + 2,
              "the resumed run's first batches")
    preempted = [p for p in (tmp_path / "runs/preempted").glob("checkpoint_*preempt*")]
    assert preempted, "no checkpoint of the step in flight"
    summary = json.loads((tmp_path / "runs/preempted/summary.json").read_text())
    assert summary["status"] == "interrupted"
    # Never an improvement, never the best: the best is an evaluation's.
    assert summary["best_checkpoint"] and "preempt" not in Path(summary["best_checkpoint"]).name
    assert_same_records(summary["history"], expected[:len(summary["history"])])
    counts_before = trained_samples(tmp_path / "preempted")
    state = torch.load(sorted(preempted)[-1] / "train_state.pt", weights_only=True)
    consumed, epoch = state["consumed"], state["epoch"]

    # The last resume: 3 workers instead of 2 (half a CPU each: this machine has 2). The rest
    # of the epoch is re-sharded.
    final = start("preempted", "--resume", "--set", "scaling.num_workers=3",
                  "--set", "scaling.cpus_per_worker=0.5")
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err[-3000:]
    counts = trained_samples(tmp_path / "preempted")
    # Every sample once per epoch; the only repeats are the padding that gives the 3 ranks
    # as many batches in the re-sharded epoch (and in each later epoch of 96 / 3 none).
    assert set(counts) == set(range(N)) and min(counts.values()) == EPOCHS
    padding = (-(N - consumed)) % 3 if consumed is not None else 0
    assert sum(counts.values()) == EPOCHS * N + padding, (counts, consumed, epoch)
    assert sum(counts_before.values()) <= consumed + N * (epoch - 1) if consumed else True
    resumed = json.loads((tmp_path / "runs/preempted/summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["global_step"] is not None
