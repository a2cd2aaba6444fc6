"""Writing files safely, one implementation for every writer of the project.

- Local files are written atomically: a temp file in the same directory, fsynced, renamed
  over the target, then the directory fsynced (so the rename itself survives a crash).
- Object stores (a pyarrow filesystem other than the local one) write whole objects, which
  appear complete or not at all.
- JSON is encoded one way everywhere (indented, NaN/inf kept as the JSON extension, so a
  diverged run's record still round-trips).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode()


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """A temp path next to ``path`` for the caller to write; on success it is fsynced and
    renamed over ``path``; on any failure it is removed and ``path`` is left as it was."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def write_object(fs: Any, path: str, data: bytes | memoryview) -> None:
    """One whole object (or file) on a pyarrow filesystem, its parent created first."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(path), data)
        return
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)
