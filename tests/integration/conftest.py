"""One real local Ray per test module (Ray's start-up dominates small runs).

Not one per session: the CLI tests start their own Ray in a subprocess, and two local Rays on
one machine confuse Ray's address discovery (its placement-group cleaner among others).
"""

from __future__ import annotations

import copy
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

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


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def overfit_config(tmp_path: Path, name: str = "overfit", **sections: Any) -> RunConfig:
    """The test workload whose validation loss improves, then worsens, on 2 workers."""
    base = {
        "name": name,
        "storage_path": str(tmp_path / "runs"),
        "seed": 0,
        "workload": {"entrypoint": "tests.workloads.overfit:build", "params": {}},
        "scaling": {"num_workers": 2},
        "train": {"epochs": 10, "batch_size": 8, "lr": 0.002},
        "tracker": {"monitor": "val_loss"},
        "wandb": {"mode": "disabled"},
    }
    return RunConfig.model_validate(_merge(base, sections))


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))


def assert_close(actual: float, expected: float, rel: float = 1e-6) -> None:
    assert actual == pytest.approx(expected, rel=rel, abs=1e-12), (actual, expected)


def free_port() -> int:
    """A TCP port nothing listens on right now, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_pids(pattern: str = "raylet|gcs_server|^ray::") -> set[int]:
    """Live processes of any local Ray: its daemons and its workers (not zombies: a process
    that exited whose parent died is reaped by init, which a container may not run)."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True,
                         text=True).stdout
    return {int(pid) for pid in out.split() if not _zombie(pid)}


def _zombie(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True  # gone already


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
