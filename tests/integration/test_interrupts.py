"""Real signals to a real ``orchestrator train`` process (found by its pid), and a real
SIGKILL of the Ray Train controller: every run ends with its record written, one line saying
what happened and how to continue, and ``--resume`` continues it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import REPO, RunProcesses, overfit_config, recorded, wait_for

pytestmark = pytest.mark.integration

EPOCHS = 12


def epochs_done(run_dir: Path) -> int:
    return len(recorded(run_dir))


@pytest.fixture
def cli_run(tmp_path, ray_tmp):
    # A signal lets the workers finish the step in flight (failure.preempt_grace_s): each
    # batch lasts a tenth of a second, so that the step after a signal is never the run's end.
    cfg = overfit_config(tmp_path, name="signals", test_split=True, train={"epochs": EPOCHS},
                         workload={"params": {"step_seconds": 0.1}},
                         checkpoint={"resume_every_n_epochs": 1})  # resumes where it stopped
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    # Each start's local Ray lives under this test's own temp dir, which its daemons name:
    # the run's processes are found by it (and as the drivers' descendants), never by name.
    run = RunProcesses(marker=ray_tmp)
    # A poll each second: every epoch lasts about a second, time enough to signal mid-run.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
           "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "orchestrator", "train", "run.yaml"]

    def start(*extra: str) -> subprocess.Popen:
        proc = subprocess.Popen([*command, *extra], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        run.roots.append(proc.pid)
        return proc

    return start, tmp_path / "runs" / "signals", run


def gone(run: RunProcesses, pattern: str = "") -> bool:
    return not run.find(pattern)


def stop_with(proc: subprocess.Popen, run: RunProcesses, run_dir: Path, signum: int,
              after: int):
    wait_for(lambda: epochs_done(run_dir) >= after or proc.poll() is not None, 240,
             f"epoch {after}")
    assert proc.poll() is None, "\n".join(proc.communicate())
    run.find()  # every process of the run, remembered before it is stopped
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return out, err


def last_line(err: str, out: str) -> str:
    """What the user is told last: one line, with the command that continues the run."""
    assert "Traceback" not in out + err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.endswith("; continue with: orchestrator train run.yaml --resume"), err[-2000:]
    return last


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_sigint_sigterm_a_killed_controller_and_driver_then_resume(cli_run):
    start, run_dir, run = cli_run

    # Ctrl-C while the workers start (before any report): the controller goes with Ray.
    proc = start()
    wait_for(lambda: run_dir.is_dir() or proc.poll() is not None, 240, "the run to start")
    run.find()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert last_line(err, out).startswith("interrupted by SIGINT after epoch 0 of")
    assert summary_of(run_dir)["status"] == "interrupted"
    wait_for(lambda: gone(run), 30, "the run's Ray processes to exit")

    proc = start("--resume")
    out, err = stop_with(proc, run, run_dir, signal.SIGTERM, after=2)
    assert proc.returncode == 143, err[-3000:]
    line = last_line(err, out)
    assert line.startswith("interrupted by SIGTERM after epoch")
    summary = summary_of(run_dir)
    assert summary["status"] == "interrupted" and summary["epochs_completed"] >= 2
    assert summary["best_epoch"] is not None
    assert (Path(summary["best_checkpoint"]) / "model.safetensors").is_file()
    assert f"epoch {summary['best_epoch']}" in line
    # The local Ray and its workers are gone with the run: nothing left behind.
    wait_for(lambda: gone(run), 30, "the run's Ray processes to exit")

    proc = start("--resume")
    done_before = summary["epochs_completed"]
    out, err = stop_with(proc, run, run_dir, signal.SIGINT, after=done_before + 1)
    assert proc.returncode == 130, err[-3000:]
    assert last_line(err, out).startswith("interrupted by SIGINT")
    assert summary_of(run_dir)["status"] == "interrupted"
    wait_for(lambda: gone(run), 30, "the run's Ray processes to exit")

    # The Ray Train controller SIGKILLed (Ray does not restart it): one line, the run failed.
    proc = start("--resume")
    wait_for(lambda: epochs_done(run_dir) > summary_of(run_dir)["epochs_completed"]
             or proc.poll() is not None, 240, "an epoch after the resume")
    os.kill(run.one(r"^ray::TrainController"), signal.SIGKILL)  # this run's, not the newest
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err[-3000:]
    assert last_line(err, out).startswith("error: the Ray Train controller died")
    assert summary_of(run_dir)["status"] == "failed"
    wait_for(lambda: gone(run), 30, "the run's Ray processes to exit")

    # The driver itself SIGKILLed: nothing can be said, but its local Ray goes with it and
    # --resume continues from what was saved.
    proc = start("--resume")
    stop_with(proc, run, run_dir, signal.SIGKILL, after=summary_of(run_dir)["epochs_completed"] + 1)
    assert proc.returncode == -signal.SIGKILL
    training = "^ray::(TrainController|RayTrainWorker)"
    wait_for(lambda: gone(run, training), 30, "the controller and workers to exit")

    proc = start("--resume")
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    final = summary_of(run_dir)
    assert final["status"] == "completed" and final["epochs_completed"] == EPOCHS
    assert [h["epoch"] for h in final["history"]] == list(range(1, EPOCHS + 1))
    assert final["test_metrics"] is not None
    # Storage holds the best and the latest only, whatever each stop left in flight.
    kept = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert len(kept) <= 2 and Path(final["best_checkpoint"]).name in kept, kept
    # Ray's agents notice their raylet is gone about a minute after the driver's SIGKILL.
    wait_for(lambda: gone(run), 120, "the run's Ray processes to exit")
