"""Which directories are this project's to replace, and replacing one only once nothing can
fail any more.

A run (or search) directory gets a marker file when it is created. ``--overwrite`` deletes
only a directory that has it, never one holding the working directory or the home directory,
and only after the config, the cluster and the W&B run were checked: until then the old run
is set aside (a rename, on a local disk) and put back if anything fails. The marker says
what the directory holds (a run or a search): neither command works inside the other's.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from orchestrator import storage
from orchestrator.errors import UserError
from workers.contract.names import (
    HISTORY_FILE,
    LEADERBOARD_FILE,
    RUN_LOCK,
    RUN_MARKER,
    SEARCH_FILE,
    SUMMARY_FILE,
)

T = TypeVar("T")


def mark(run_dir: str, kind: str) -> None:
    """Record that this project created ``run_dir`` (``kind``: run | search)."""
    storage.write_json(storage.join(run_dir, RUN_MARKER),
                       {"created_by": "orchestrator", "kind": kind,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def is_ours(run_dir: str) -> bool:
    return storage.exists(storage.join(run_dir, RUN_MARKER))


COMMAND_OF = {"run": "train", "search": "tune"}  # the command that makes each kind


def held_kind(run_dir: str) -> str | None:
    """What ``run_dir`` holds: ``run`` or ``search``, as its marker says; a marker written
    before it said so: told by the records, as ``orchestrator best`` tells them (a search's
    ``search.json`` or ``leaderboard.json``, a run's ``summary.json`` or ``history.json``);
    None when nothing tells."""
    try:
        kind = storage.read_json(storage.join(run_dir, RUN_MARKER)).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None  # no marker, or a damaged one: the records say it
    if kind in COMMAND_OF:
        return kind
    for found, names in (("search", (SEARCH_FILE, LEADERBOARD_FILE)),
                         ("run", (SUMMARY_FILE, HISTORY_FILE))):
        if any(storage.exists(storage.join(run_dir, name)) for name in names):
            return found
    return None


def check_kind(run_dir: str, kind: str) -> None:
    """A run is never trained inside a search's directory, nor a search inside a run's
    (``--resume`` would mix the two; without it the way out is the same)."""
    held = held_kind(run_dir)
    if held is not None and held != kind:
        raise UserError(
            f"{run_dir} holds a {held} (made by `orchestrator {COMMAND_OF[held]}`), not a "
            f"{kind}: `orchestrator {COMMAND_OF[kind]}` does not continue it or write into it; "
            "choose another name (--set name=...), or pass --overwrite to replace it")


def _holds(directory: Path, other: Path) -> bool:
    return other == directory or directory in other.parents


def check_deletable(run_dir: str) -> None:
    """Refuse (exit 2, one line) to delete ``run_dir`` unless this project created it."""
    if not storage.is_uri(run_dir):
        path = Path(run_dir).resolve()
        for what, other in (("the working directory", Path.cwd()),
                            ("your home directory", Path.home())):
            if _holds(path, other.resolve()):
                raise UserError(f"--overwrite: {run_dir} holds {what}; it is never deleted: "
                                "choose another name or storage_path")
    if not is_ours(run_dir):
        raise UserError(f"--overwrite: {run_dir} was not created by this tool (it has no "
                        f"{RUN_MARKER}), so it is left as it is: choose another name or "
                        "storage_path, or remove it yourself")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def running_owner(run_dir: str) -> dict | None:
    """The driver running this run or search now, from its lock; None if none is. A lock
    left by a driver that died on this host is stale (its pid is gone)."""
    path = storage.join(run_dir, RUN_LOCK)
    try:
        lock = storage.read_json(path) if storage.exists(path) else None
        if lock is None or (lock["host"] == socket.gethostname()
                            and not _alive(int(lock["pid"]))):
            return None
    except (ValueError, KeyError, TypeError):
        return None  # damaged: not evidence of anything running
    return lock


def lock(run_dir: str) -> None:
    """Mark ``run_dir`` as run by this process (``unlock`` when it ends)."""
    storage.write_json(storage.join(run_dir, RUN_LOCK), {
        "pid": os.getpid(), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S")})


def unlock(run_dir: str) -> None:
    try:
        path = storage.join(run_dir, RUN_LOCK)
        if storage.exists(path) and storage.read_json(path).get("pid") == os.getpid():
            storage.delete_file(path)
    except (OSError, ValueError, AttributeError):
        pass  # a lock that stays behind is stale once this process is gone


def check_not_running(run_dir: str) -> None:
    owner = running_owner(run_dir)
    if owner is not None:
        raise UserError(
            f"{run_dir} is in use by a running driver (pid {owner['pid']} on {owner['host']}, "
            f"since {owner['started']}); wait for it or stop it (if it is gone, delete "
            f"{storage.join(run_dir, RUN_LOCK)})")


def check_storage(run_dir: str) -> None:
    """A local storage path must be (or become) a writable directory, an object store must
    answer (in bounded time): said before anything starts, naming the path."""
    if storage.is_uri(run_dir):
        problem = storage.unreachable(run_dir)  # unreachable, unauthorised, no such bucket
        if problem:
            raise UserError(f"storage_path: {run_dir} cannot be reached ({problem[:200]}); "
                            "check the URI, the credentials and the network")
        return
    path = Path(run_dir)
    for parent in [path, *path.parents]:
        if parent.exists() or parent.is_symlink():
            break
    if not parent.is_dir():
        raise UserError(f"storage_path: {parent} is a file, not a directory; choose a "
                        "directory for the runs")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"storage_path: {parent} is not writable; choose a directory you can "
                        "write to")


def check_resumable(run_dir: str) -> None:
    """A resume writes and prunes checkpoints there: only in a run of this project (or one
    made before markers existed, which has its history or search file), whose records the
    resume reads are intact."""
    if not any(storage.exists(storage.join(run_dir, name))
               for name in (RUN_MARKER, HISTORY_FILE, SEARCH_FILE)):
        raise UserError(f"--resume: {run_dir} is not a run or search of this tool (no "
                        f"{RUN_MARKER}, {HISTORY_FILE} or {SEARCH_FILE}); nothing was touched")
    for name, key in ((HISTORY_FILE, "history"), (SEARCH_FILE, "trials")):
        path = storage.join(run_dir, name)
        if not storage.exists(path):
            continue
        try:
            if not isinstance(storage.read_json(path)[key], list):
                raise TypeError(f"{key} is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"--resume: {path} is damaged ({type(exc).__name__}: {exc}); "
                            "nothing was touched: restore it, or start afresh with "
                            "--overwrite") from None


def open_in(run_dir: str, mode: str, kind: str, open_record: Callable[[], T], *,
            keep_replaced: bool = False) -> tuple[T, SetAside | None]:
    """Open what must work before anything trains (the W&B run), then take ``run_dir``:
    an ``--overwrite``'s old run goes only once that opened, and is put back if it did not;
    a new directory is marked as ours (``kind``: run | search); this process locks it.

    ``keep_replaced``: the old run, when it was set aside on a local disk, stays aside until
    the caller knows whether the new run trains (``SetAside.discard``) or stops on a mistake
    of the user's that its workers found (``SetAside.restore``); it is returned with the
    record. Otherwise it goes now (on an object store, always: the new
    run writes where the old one was)."""
    old = SetAside(run_dir) if mode == "overwrite" else None
    try:
        opened = open_record()
    except UserError:
        if old is not None:
            old.restore()  # the old run stays as it was
        elif mode != "resume":
            storage.delete_dir(run_dir)  # nothing of a run that could not start
        raise
    kept = old if keep_replaced and old is not None and old.aside is not None else None
    if old is not None and kept is None:
        old.discard()
    if mode != "resume":
        mark(run_dir, kind)
    lock(run_dir)  # a second driver for the same directory is refused until unlock
    return opened, kept


class SetAside:
    """The old run of an ``--overwrite``, out of the way until the new one is sure to start:
    renamed next to itself on a local disk (``restore`` puts it back); left in place on an
    object store, where nothing is written to the run directory before ``discard``."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.aside: str | None = None
        if not storage.is_uri(run_dir):
            path = Path(run_dir)
            self.aside = str(path.with_name(f".{path.name}.replaced-{os.getpid()}"))
            os.rename(path, self.aside)

    def restore(self) -> None:
        if self.aside is not None:
            storage.delete_dir(self.run_dir)  # what the failed start wrote, if anything
            os.rename(self.aside, self.run_dir)

    def discard(self) -> None:
        storage.delete_dir(self.aside if self.aside is not None else self.run_dir)


def prepare_run_dir(run_dir: str, *, resume: bool, overwrite: bool, kind: str = "run") -> str:
    """Decide, explicitly, whether this invocation resumes, replaces or starts a run (or a
    search: ``kind``). A directory holding the other kind is refused unless ``overwrite``
    replaces it (whatever this tool made there is its to replace)."""
    check_storage(run_dir)
    existing = storage.is_nonempty_dir(run_dir)
    if existing:
        check_not_running(run_dir)  # the same name and storage, started twice
    if existing and not overwrite:
        check_kind(run_dir, kind)
    if existing and not (resume or overwrite):
        raise UserError(
            f"{run_dir}: a run with this name already exists; pass --resume to continue it, "
            "--overwrite to replace it, or choose another name (--set name=...)"
        )
    if existing and resume:
        check_resumable(run_dir)
        return "resume"
    if existing and overwrite:
        check_deletable(run_dir)  # before anything else: only a run of ours is replaced
        return "overwrite"
    return "fresh"
