"""Which run directories may be replaced, and replacing one only once the new run can start."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from orchestrator.errors import UserError
from orchestrator.results.checkpoints import resume_point
from orchestrator.start.run_dir import (
    SetAside,
    check_deletable,
    is_ours,
    lock,
    mark,
    open_in,
    prepare_run_dir,
    unlock,
)
from workers.contract.names import RUN_LOCK, RUN_MARKER


def a_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "history.json").write_text('{"history": []}')
    mark(str(path), "run")
    return path


def test_a_marked_run_may_be_overwritten(tmp_path: Path) -> None:
    run = a_run(tmp_path / "runs" / "mine")
    assert is_ours(str(run))
    assert prepare_run_dir(str(run), resume=False, overwrite=True) == "overwrite"
    assert prepare_run_dir(str(run), resume=True, overwrite=False) == "resume"


def test_a_directory_without_the_marker_is_never_overwritten(tmp_path: Path) -> None:
    other = tmp_path / "x" / "important"
    other.mkdir(parents=True)
    (other / "thesis.txt").write_text("years of work")
    with pytest.raises(UserError, match="not created by this tool") as info:
        prepare_run_dir(str(other), resume=False, overwrite=True)
    assert RUN_MARKER in str(info.value)
    with pytest.raises(UserError, match="not a run or search"):
        prepare_run_dir(str(other), resume=True, overwrite=False)
    assert (other / "thesis.txt").read_text() == "years of work"


def test_a_directory_holding_the_working_or_home_directory_is_never_deleted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = a_run(tmp_path / "runs" / "mine")  # marked, even
    (run / "src").mkdir()
    monkeypatch.chdir(run / "src")
    with pytest.raises(UserError, match="holds the working directory"):
        check_deletable(str(run))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(run))
    with pytest.raises(UserError, match="holds your home directory"):
        check_deletable(str(run))


def test_an_existing_run_needs_an_explicit_choice(tmp_path: Path) -> None:
    run = a_run(tmp_path / "runs" / "mine")
    with pytest.raises(UserError, match="--resume.*--overwrite"):
        prepare_run_dir(str(run), resume=False, overwrite=False)
    assert prepare_run_dir(str(tmp_path / "runs" / "new"), resume=False,
                           overwrite=False) == "fresh"


def test_set_aside_restores_the_old_run_when_the_new_one_cannot_start(tmp_path: Path) -> None:
    run = a_run(tmp_path / "runs" / "mine")
    (run / "model.safetensors").write_bytes(b"old weights")
    old = SetAside(str(run))
    assert not run.exists()  # out of the way of the new run
    run.mkdir()
    (run / "wandb").mkdir()  # what a failed start wrote
    old.restore()
    assert (run / "model.safetensors").read_bytes() == b"old weights"
    assert not (run / "wandb").exists()
    assert sorted(p.name for p in run.parent.iterdir()) == ["mine"]


def test_set_aside_discards_the_old_run_once_the_new_one_starts(tmp_path: Path) -> None:
    run = a_run(tmp_path / "runs" / "mine")
    (run / "model.safetensors").write_bytes(b"old weights")
    old = SetAside(str(run))
    run.mkdir()
    (run / "new.txt").write_text("new run")
    old.discard()
    assert sorted(p.name for p in run.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in run.parent.iterdir()) == ["mine"]


def test_resume_skips_unreadable_metadata_and_refuses_when_nothing_is_intact(tmp_path):
    run = a_run(tmp_path / "runs" / "mine")
    for epoch in (1, 2):
        ckpt = run / f"checkpoint_epoch{epoch:04d}_1"
        ckpt.mkdir()
        (ckpt / "model.safetensors").write_bytes(b"weights")
        (ckpt / "metadata.json").write_text(json.dumps({
            "epoch": epoch, "is_best": True,
            "files": {"model.safetensors": {"size": 7, "sha256": hashlib.sha256(
                b"weights").hexdigest()}}}))
    (run / "checkpoint_epoch0002_1" / "metadata.json").write_text('{"epoch": 2, "is_b')
    chosen, damaged = resume_point(str(run))
    assert chosen == str(run / "checkpoint_epoch0001_1")
    assert damaged == [f"{run / 'checkpoint_epoch0002_1'}/metadata.json is damaged"]
    (run / "checkpoint_epoch0001_1" / "metadata.json").write_text("[]")
    with pytest.raises(UserError, match="no intact checkpoint"):
        resume_point(str(run))


def test_a_run_in_use_by_a_live_driver_is_refused_and_a_dead_ones_lock_is_stale(tmp_path):
    run = a_run(tmp_path / "runs" / "mine")
    driver = subprocess.Popen(["sleep", "60"])  # a live process standing for the driver
    try:
        (run / RUN_LOCK).write_text(json.dumps({"pid": driver.pid, "host": socket.gethostname(),
                                                "started": "2026-11-29 10:00:00"}))
        for flags in ({"resume": True, "overwrite": False}, {"resume": False, "overwrite": True},
                      {"resume": False, "overwrite": False}):
            with pytest.raises(UserError, match=f"running driver \\(pid {driver.pid} on "):
                prepare_run_dir(str(run), **flags)
    finally:
        driver.kill()
        driver.wait()
    assert prepare_run_dir(str(run), resume=True, overwrite=False) == "resume"  # stale now


def test_a_lock_from_another_host_is_respected_and_only_its_owner_unlocks(tmp_path):
    run = a_run(tmp_path / "runs" / "mine")
    other = {"pid": 1, "host": "another-host", "started": "2026-11-29 10:00:00"}
    (run / RUN_LOCK).write_text(json.dumps(other))
    with pytest.raises(UserError, match="on another-host"):
        prepare_run_dir(str(run), resume=True, overwrite=False)
    unlock(str(run))
    assert (run / RUN_LOCK).exists()  # not ours to remove
    (run / RUN_LOCK).unlink()
    lock(str(run))
    unlock(str(run))
    assert not (run / RUN_LOCK).exists()


def test_an_overwrite_replaces_the_old_run_only_once_the_new_one_opened(tmp_path):
    run = a_run(tmp_path / "runs" / "mine")
    (run / "model.safetensors").write_bytes(b"old weights")

    def bad_key():
        (run / "wandb").mkdir(parents=True)  # W&B writes its run dir before failing
        raise UserError("wandb: the API key was refused")

    with pytest.raises(UserError, match="API key"):
        open_in(str(run), "overwrite", "run", bad_key)
    assert (run / "model.safetensors").read_bytes() == b"old weights"
    assert not (run / "wandb").exists() and not (run / RUN_LOCK).exists()

    assert open_in(str(run), "overwrite", "run", lambda: "opened") == ("opened", None)
    assert sorted(p.name for p in run.iterdir()) == sorted([RUN_LOCK, RUN_MARKER])
    assert json.loads((run / RUN_LOCK).read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in run.parent.iterdir()) == ["mine"]


def test_a_kept_old_run_waits_aside_until_the_new_one_trains_or_fails(tmp_path):
    """``keep_replaced``: the old run stays aside, whole, while the new run's workers check
    the workload; a mistake there puts it back, training discards it."""
    run = a_run(tmp_path / "runs" / "mine")
    (run / "model.safetensors").write_bytes(b"old weights")
    opened, kept = open_in(str(run), "overwrite", "run", lambda: "opened", keep_replaced=True)
    assert opened == "opened" and kept is not None
    assert sorted(p.name for p in run.iterdir()) == sorted([RUN_LOCK, RUN_MARKER])
    aside = [p for p in run.parent.iterdir() if p.name != "mine"]
    assert [(p / "model.safetensors").read_bytes() for p in aside] == [b"old weights"]
    (run / "checkpoint_epoch0001").mkdir()  # what the new run wrote before its mistake
    kept.restore()
    assert (run / "model.safetensors").read_bytes() == b"old weights"
    assert not (run / "checkpoint_epoch0001").exists()
    assert sorted(p.name for p in run.parent.iterdir()) == ["mine"]

    _, kept = open_in(str(run), "overwrite", "run", lambda: "opened", keep_replaced=True)
    kept.discard()
    assert sorted(p.name for p in run.iterdir()) == sorted([RUN_LOCK, RUN_MARKER])
    assert sorted(p.name for p in run.parent.iterdir()) == ["mine"]
