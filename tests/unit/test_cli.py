"""The CLI's commands that start no training stay light, and a worker's user error is found
by its type inside Ray's worker-group error (no Ray started: the error objects are built)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator import storage
from orchestrator.errors import failure_summary, user_error_in
from workers.contract.user_errors import WorkloadError
from workers.decisions.tracker import MonitorNotReportedError

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "wandb", "fastai")

PROBE = (
    "import runpy, sys\n"
    "sys.argv = ['orchestrator', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('orchestrator', run_name='__main__')\n"
    "except SystemExit:\n"
    "    pass\n"
    f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
    "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
)


def imports_of(tmp_path: Path, *args: str) -> tuple[str, subprocess.CompletedProcess]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tmp_path, text=True,
                          capture_output=True, timeout=60, env={"PYTHONPATH": str(REPO)})
    line = next(x for x in proc.stderr.splitlines() if x.startswith("HEAVY="))
    return line.removeprefix("HEAVY="), proc


def test_help_imports_no_torch_ray_or_wandb(tmp_path):
    heavy, proc = imports_of(tmp_path, "--help")
    assert "orchestrator train" in proc.stdout or "train" in proc.stdout
    assert heavy == ""


def test_best_imports_no_torch_ray_or_wandb(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({
        "name": "run", "run_dir": str(run), "best_epoch": 2, "epochs_completed": 3,
        "monitor": "val_loss", "mode": "min", "policy": "best", "best_checkpoint": None,
        "best_metrics": {"epoch": 2, "val_loss": 0.5}, "test_metrics": None}))
    heavy, proc = imports_of(tmp_path, "best", str(run))
    assert "best epoch 2 of 3" in proc.stdout
    assert heavy == ""


@pytest.mark.parametrize(("name", "text"), [
    ("summary.json", '{"name": "run", "best_epoch": 2, "epochs_compl'),  # cut short
    ("summary.json", "[1, 2, 3]\n"),  # JSON, but not a record
    ("summary.json", '{"name": "run"}\n'),  # a record without its fields
    ("leaderboard.json", "\x00\x00\x00\n"),
])
def test_best_on_a_damaged_record_is_one_line_and_exit_2(tmp_path, name, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_text(text)
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "best", str(run)], cwd=tmp_path,
                          text=True, capture_output=True, timeout=60,
                          env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {run / name}: damaged"), lines
    assert (run / name).read_text() == text  # read, never touched


# No network here but the package registries: gs:// without credentials is real (Arrow's GCS
# client retried for minutes, silently); the s3:// endpoint refuses connections.
UNANSWERED_GS = "gs://bucket/runs"
REFUSED_S3 = "s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"


UNANSWERED = {
    "best-gs": (("best", f"{UNANSWERED_GS}/x"), f"error: {UNANSWERED_GS}/x cannot be reached ("),
    "best-s3": (("best", REFUSED_S3), f"error: {REFUSED_S3} cannot be reached (OSError: "),
    "train-resume-gs": (("train", "cfg.yaml", "--resume"),
                        f"error: storage_path: {UNANSWERED_GS}/run cannot be "),
    "tune-gs": (("tune", "cfg.yaml"), f"error: storage_path: {UNANSWERED_GS}/run cannot be "
                                      "reached ("),
}


def run_unanswered(directory: Path, args: tuple[str, ...]) -> tuple[subprocess.CompletedProcess,
                                                                    float]:
    directory.mkdir()
    (directory / "cfg.yaml").write_text(f"storage_path: {UNANSWERED_GS}\n"
                                        "workload: {entrypoint: workers.workloads.digits:build}\n")
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=directory,
                          text=True, capture_output=True, timeout=120,
                          env={"PYTHONPATH": str(REPO)})
    return proc, time.monotonic() - began


@pytest.fixture(scope="module")
def unanswered(tmp_path_factory):
    """Each command of UNANSWERED against a store that does not answer, side by side (each
    mostly waits for the store): its directory, its process and how long it took; and
    ``probe-gs``: what ``storage.unreachable`` alone said of the gs:// store, and when."""
    root = tmp_path_factory.mktemp("unanswered")
    with ThreadPoolExecutor(max_workers=len(UNANSWERED) + 1) as pool:
        futures = {case: pool.submit(run_unanswered, root / case, args)
                   for case, (args, _) in UNANSWERED.items()}
        probe = pool.submit(timed_probe, UNANSWERED_GS)
        return {"probe-gs": probe.result(),
                **{case: (root / case, *future.result()) for case, future in futures.items()}}


@pytest.mark.parametrize("case", list(UNANSWERED))
def test_an_object_store_that_does_not_answer_is_one_line_and_exit_2_in_seconds(
        unanswered, case):
    directory, proc, took = unanswered[case]
    start = UNANSWERED[case][1]
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(start), lines
    # Before: no answer for minutes. Now the probe's 10 s at most beside the start-up (about
    # 10-20 s for train and tune, which import torch; more on a loaded machine).
    assert took < 90, f"{took:.1f} s"
    assert sorted(p.name for p in directory.iterdir()) == ["cfg.yaml"]  # nothing written


def timed_probe(uri: str) -> tuple[str | None, float]:
    began = time.monotonic()
    return storage.unreachable(uri), time.monotonic() - began


def test_the_storage_probe_is_bounded(tmp_path, unanswered):
    assert storage.unreachable(f"file://{tmp_path}") is None
    assert storage.unreachable(f"file://{tmp_path}", seconds=0.001) == "no answer within 0.001 s"
    problem, took = unanswered["probe-gs"]  # the probe alone, beside the commands
    assert problem and took < storage.PROBE_S + 5, problem


def _worker_group_error(exc: Exception):
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    try:
        raise exc
    except Exception as raised:  # noqa: BLE001 - wrapped as Ray wraps a worker's exception
        wrapped = RayTaskError("train_fn", "Traceback (most recent call last): ...", raised)
        wrapped = wrapped.as_instanceof_cause()
    return WorkerGroupError("rank 0 failed", {0: wrapped, 1: wrapped})


@pytest.mark.parametrize("exc", [
    MonitorNotReportedError("tracker.monitor: 'val_auc' is not reported by this run"),
    WorkloadError("workload.entrypoint: mod returned an object without model"),
])
def test_user_errors_are_found_by_type_in_a_worker_group_error(exc):
    message = user_error_in(_worker_group_error(exc))
    assert message == str(exc)


def test_other_failures_are_not_user_errors_and_name_the_original_exception():
    error = _worker_group_error(RuntimeError("CUDA out of memory\nmore details"))
    assert user_error_in(error) is None
    assert failure_summary(error) == "RuntimeError: CUDA out of memory"


def test_a_reader_that_goes_away_does_not_stop_the_run():
    import io

    from orchestrator.start.console import Console

    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    console = Console(stream=ClosedPipe())
    console.say("epoch 1/3 ...")  # as `orchestrator train ... | head -1` does
    console.say("epoch 2/3 ...")
    assert console.gone


def test_sigusr1_prints_where_a_driver_is_and_it_goes_on(tmp_path):
    """What the CLI installs (``cli.main.install_stack_dumps``) in a real process that waits:
    SIGUSR1 prints every thread's stack to stderr, and the process carries on."""
    import signal
    import time

    script = ("import time, sys\n"
              "from orchestrator.cli.main import install_stack_dumps\n"
              "install_stack_dumps()\n"
              "print('ready', flush=True)\n"
              "def waiting_for_the_search():\n"
              "    time.sleep(2)\n"
              "waiting_for_the_search()\n"
              "print('went on', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == "ready\n"
    time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out == "went on\n", err
    assert "waiting_for_the_search" in err and "Current thread" in err, err
