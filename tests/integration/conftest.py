"""One real local Ray per test module (Ray's start-up dominates small runs).

Not one per session: the CLI tests start their own Ray in a subprocess, and two local Rays on
one machine confuse Ray's address discovery (its placement-group cleaner among others).
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from workers.contract.config import RunConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from orchestrator.start.cluster import init_ray

    init_ray()
    yield
    ray.shutdown()


def own_state_api() -> str:
    """The state API of the Ray this process is connected to. ``ray.util.state`` without an
    address looks for "the" local Ray, and finds two where another test process runs its own."""
    from workers.compat import dashboard_url

    return "http://" + dashboard_url()


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


OVERFIT = "tests.workloads.overfit:build"


def overfit_config(tmp_path: Path, name: str = "overfit", test_split: bool = False,
                   **sections: Any) -> RunConfig:
    """The test workload whose validation loss improves, then worsens, on 2 workers.

    ``test_split``: give it its test split, which the run scores with the best weights in a
    Ray task of its own once training ends (about 3 s here, most of a short run's record
    step); only the tests that check the test metrics ask for it."""
    base = {
        "name": name,
        "storage_path": str(tmp_path / "runs"),
        "seed": 0,
        "workload": {"entrypoint": OVERFIT, "params": {}},
        "scaling": {"num_workers": 2},
        "train": {"epochs": 10, "batch_size": 8, "lr": 0.002},
        "tracker": {"monitor": "val_loss"},
        "wandb": {"mode": "disabled"},
    }
    merged = _merge(base, sections)
    if merged["workload"]["entrypoint"] == OVERFIT:
        merged["workload"]["params"].setdefault("with_test", test_split)
    return RunConfig.model_validate(merged)


def recorded(run_dir: Path) -> list[dict[str, Any]]:
    """The run's history as the project reads it while the run goes (history.json, then the
    segments written since: ``orchestrator.results.history``); empty before the first."""
    from orchestrator.results.history import read_history

    return read_history(str(run_dir))


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))


def assert_close(actual: float, expected: float, rel: float = 1e-6) -> None:
    assert actual == pytest.approx(expected, rel=rel, abs=1e-12), (actual, expected)


def run_cli(args: list[str], cwd: Path, env: dict[str, str],
            timeout: float) -> subprocess.CompletedProcess:
    """``python -m orchestrator *args`` to its end. Past ``timeout`` the test fails with where
    the driver was: SIGUSR1 makes it print every thread's stack (``cli.main``), then it is
    killed, and its output is the failure's message."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(3)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"orchestrator {' '.join(args)} still ran after {timeout} s; its stacks:\n"
                    f"{err[-12000:]}\nits output:\n{out[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def free_port() -> int:
    """A TCP port nothing listens on right now, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc(NamedTuple):
    ppid: int
    started: int  # clock ticks after boot: with the pid, names one process for good
    cmdline: str


def process_table() -> dict[int, Proc]:
    """Every live process on the machine (zombies left out: a process that exited whose
    parent died is reaped by init, which a container may not run)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
        except (OSError, IndexError):
            continue  # gone already
        if fields[0] != "Z":
            table[int(entry.name)] = Proc(int(fields[1]), int(fields[19]), cmdline)
    return table


def own_processes(table: dict[int, Proc], roots: Iterable[int] = (),
                  marker: str | None = None) -> set[int]:
    """The processes of one run, found by what it owns rather than by name: ``roots`` (the
    driver's pid, a ``ray start`` node's pid) and processes whose command line holds
    ``marker`` (the run's own Ray temp dir: its raylet, GCS and agents name it), with all
    their descendants (Ray's workers are the raylet's children; their command lines are
    rewritten to ``ray::...`` and name nothing)."""
    found = {pid for pid in roots if pid in table}
    if marker:
        found |= {pid for pid, proc in table.items() if marker in proc.cmdline}
    children: dict[int, list[int]] = {}
    for pid, proc in table.items():
        children.setdefault(proc.ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class RunProcesses:
    """One run's processes, never another run's: a fault is injected into them, and the
    test waits for them (not for every Ray on the machine) to exit. Where several Rays run on
    one machine, a search by name (``pgrep -n -f '^ray::TrainController'``) picks whichever
    started last: another run's.

    Every process found is remembered (pid and start time), so that ``find`` still sees the
    workers of a raylet that died before them, and never mistakes a reused pid for one."""

    def __init__(self, roots: Iterable[int] = (), marker: str | None = None,
                 read: Callable[[], dict[int, Proc]] = process_table) -> None:
        self.roots = list(roots)  # add a driver's pid as soon as it is started
        self.marker = marker
        self.read = read
        self.seen: set[tuple[int, int]] = set()  # (pid, start time)

    def find(self, pattern: str = "") -> dict[int, str]:
        """The run's live processes whose command line matches ``pattern`` (re.search):
        pid -> command line."""
        table = self.read()
        # A root is the process first seen under its pid: once it exited and was reaped,
        # another process may get that pid.
        roots = [pid for pid in self.roots if pid in table and self._first_seen(pid, table)]
        own = own_processes(table, roots, self.marker)
        self.seen |= {(pid, table[pid].started) for pid in own}
        return {pid: proc.cmdline for pid, proc in table.items()
                if (pid, proc.started) in self.seen and re.search(pattern, proc.cmdline)}

    def _first_seen(self, pid: int, table: dict[int, Proc]) -> bool:
        started = next((s for p, s in self.seen if p == pid), table[pid].started)
        return started == table[pid].started

    def one(self, pattern: str) -> int:
        """The run's only process matching ``pattern`` (a fault needs exactly one target)."""
        found = self.find(pattern)
        assert len(found) == 1, f"{pattern!r} matched {found or 'none'} of this run"
        return next(iter(found))


@pytest.fixture
def ray_tmp():
    """A temp dir of the test's own for a Ray that a command it runs starts (``RAY_TMPDIR``):
    that Ray's daemons name it in their command lines (``RunProcesses(marker=...)``)."""
    path = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def secret_markers() -> dict[str, str]:
    """Marker values for the secrets a user's environment may hold (each unique to the test,
    in the shape its owner expects: a W&B key is 40 characters)."""
    return {"WANDB_API_KEY": secrets.token_hex(20),
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "AWS_SECRET_ACCESS_KEY": "awssecret" + secrets.token_hex(16),
            "AWS_SESSION_TOKEN": "awssession" + secrets.token_hex(16)}


def find_secrets(markers: dict[str, str], roots: list[Path],
                 texts: dict[str, str]) -> tuple[list[str], list[Path]]:
    """Where any marker value appears: every regular file under ``roots`` (byte for byte) and
    each named text (what a command printed). Returns the findings and the files read."""
    found, read = [], []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            read.append(path)
            found += [f"{name} in {path}" for name, value in markers.items()
                      if value.encode() in data]
    for where, text in texts.items():
        found += [f"{name} in {where}" for name, value in markers.items() if value in text]
    return found, read


def stop_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """Stop a `ray start --block` node and everything it started (its own process group):
    SIGTERM (it stops its processes), then SIGKILL what is left after ``grace_s``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


# A real S3-compatible server (moto) for the tests that store runs or read data there.
S3_BUCKET = "ml-runs"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_server():
    """``moto_server`` on a free port with ``S3_BUCKET`` created: its port, a boto3 client,
    and the credentials any client of it needs."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H",
                               "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket=S3_BUCKET)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    try:
        yield {"port": port, "client": client, "env": S3_CREDENTIALS}
    finally:
        server.terminate()
        server.wait(timeout=30)
