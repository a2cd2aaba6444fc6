"""Every model file's size and sha256, recorded in its checkpoint's metadata.json and checked
before the file is trusted again (a resume, ``orchestrator best``). No torch here: the CLI
checks files without importing it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

FILES_KEY = "files"  # in metadata.json: {file name: {"size": bytes, "sha256": hex}}


def file_digest(data: bytes | memoryview) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def damage(metadata: dict[str, Any], read: Callable[[str], bytes]) -> str | None:
    """What is wrong with a checkpoint's files, in a few words naming the file; None when
    every recorded file is intact. ``read(name)``: a file's bytes (OSError: cannot)."""
    for name, expected in metadata.get(FILES_KEY, {}).items():
        try:
            data = read(name)
        except OSError:
            return f"{name} is missing"
        if len(data) != expected["size"]:
            return f"{name} has {len(data)} bytes, {expected['size']} were written"
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            return f"{name} does not match its sha256"
    return None


def newest_intact(checkpoints: Iterable[tuple[Any, str]],
                  check: Callable[[str], str | None]) -> tuple[str | None, list[str]]:
    """The newest (by epoch, or ``names.point``) checkpoint whose files are intact, and what
    was damaged in the newer ones (``"<name>: <damage>"``). ``check(name)``: ``damage`` of
    that checkpoint."""
    damaged: list[str] = []
    for _, name in sorted(checkpoints, reverse=True):
        problem = check(name)
        if problem is None:
            return name, damaged
        damaged.append(f"{name}/{problem}")
    return None, damaged
