"""A run bounded by ``timeout 900 orchestrator train ...`` (how CI scripts and job wrappers
bound one), stopped by a SIGTERM to ``timeout``: it forwards the signal to the driver and then
to its whole process group, the driver again among them. One stop all the same: the step in
flight saved, the record written, one line with the command that continues the run; then
``--resume`` trains no step twice, and every evaluation is printed once across the two."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import REPO, RunProcesses, overfit_config, recorded, wait_for
from tests.integration.test_interrupts import gone, last_line, summary_of
from tests.integration.test_wandb import history_rows
from tests.integration.test_wandb import wandb_env as wandb_env  # a fixture, re-exported

pytestmark = pytest.mark.integration

EPOCHS = 8  # two optimizer steps an epoch, each evaluated: 16 evaluations
EVALUATION = re.compile(r"^epoch \d+/\d+\s+step \d+ \(global (\d+)\)", re.MULTILINE)
RAY_LOG_LINE = re.compile(r"\w+\.(cc|h):\d+")  # core_worker.cc:..., rpc_client.h:...


def bounded_run(tmp_path: Path, env: dict[str, str], run: RunProcesses,
                *extra: str) -> subprocess.Popen:
    """``timeout 900 python -m orchestrator train run.yaml``, in a session of its own as a
    job wrapper starts it (``timeout`` makes its own process group in any case)."""
    proc = subprocess.Popen(["timeout", "900", sys.executable, "-m", "orchestrator", "train",
                             "run.yaml", *extra], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    run.roots.append(proc.pid)
    return proc


def clean(out: str, err: str) -> None:
    """Nothing of Ray's own (its C++ log lines), no W&B warning (no W&B call failed), no
    second stop."""
    assert not RAY_LOG_LINE.search(err), err[-3000:]
    assert "W&B" not in err and "again: stopping now" not in out + err, (out[-2000:],
                                                                        err[-2000:])


def test_sigterm_to_timeout_is_one_stop_and_resume_prints_every_evaluation_once(
        wandb_env, ray_tmp):
    tmp_path = wandb_env
    # Each training batch lasts 0.3 s, so that the signal lands mid-run.
    cfg = overfit_config(tmp_path, name="bounded",
                         train={"epochs": EPOCHS, "eval_every_n_steps": 1},
                         workload={"params": {"step_seconds": 0.3}},
                         wandb={"mode": "offline"})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    run_dir = tmp_path / "runs" / "bounded"
    run = RunProcesses(marker=ray_tmp)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)

    proc = bounded_run(tmp_path, env, run)
    wait_for(lambda: len(recorded(run_dir)) >= 3 or proc.poll() is not None, 240,
             "three evaluations")
    assert proc.poll() is None, "\n".join(proc.communicate())
    run.find()  # every process of the run, remembered before it is stopped
    proc.send_signal(signal.SIGTERM)  # to timeout, by its pid
    first_out, first_err = proc.communicate(timeout=120)
    assert proc.returncode == 143, first_err[-3000:]
    assert last_line(first_err, first_out).startswith("interrupted by SIGTERM after epoch")
    clean(first_out, first_err)
    assert "the step in flight is saved: --resume goes on at the next one" in first_out
    summary = summary_of(run_dir)
    assert summary["status"] == "interrupted"
    preempted = [p.name for p in run_dir.glob("checkpoint_step*_preempt_*")
                 if (p / "metadata.json").is_file()]
    assert preempted == [f"checkpoint_step{summary['global_step']:08d}_preempt_"
                         + preempted[0].rsplit("_", 1)[1]], preempted
    wait_for(lambda: gone(run), 120, "the run's Ray processes to exit")  # a loaded machine

    proc = bounded_run(tmp_path, env, run, "--resume")
    second_out, second_err = proc.communicate(timeout=400)
    assert proc.returncode == 0, second_err[-3000:]
    clean(second_out, second_err)
    final = summary_of(run_dir)
    steps = [record["global_step"] for record in final["history"]]
    assert final["status"] == "completed" and steps == list(range(1, 2 * EPOCHS + 1))
    printed = Counter(int(n) for n in EVALUATION.findall(first_out + second_out))
    assert printed == Counter(steps), (first_out, second_out)
    # Each driver logs a W&B run of its own: together they hold every evaluation of the
    # record once (the stopped one's last evaluations too, logged before its summary).
    logged = Counter(row["global_step"] for run in (summary, final)
                     for row in history_rows(run["wandb"]["run"]) if "val_loss" in row)
    assert logged == Counter(steps), logged
    wait_for(lambda: gone(run), 120, "the run's Ray processes to exit")
