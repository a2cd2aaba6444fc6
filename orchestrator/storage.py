"""Run files on a local path or a pyarrow URI (s3://, gs://, file://), the same way.

Writes go through ``workers.files`` (atomic local files, whole objects on object stores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from workers.files import json_bytes, write_object

if TYPE_CHECKING:
    from workers.contract.config import RunConfig


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(storage_path: str) -> str:
    """Absolute local path, or the URI unchanged (Ray needs absolute local paths)."""
    if is_uri(storage_path):
        return storage_path
    return os.path.abspath(os.path.expanduser(storage_path))


def run_dir(cfg: RunConfig) -> str:
    """``<storage_path>/<name>``: a run's (or a search's) directory."""
    return join(resolve(cfg.storage_path), cfg.name)


def join(base: str, *parts: str) -> str:
    """Join path parts, keeping a URI's query string (``?endpoint_override=...``) at the end."""
    root, sep, query = base.partition("?")
    joined = "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return joined + sep + query


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


# How long a command waits for an object store to answer its first look, and how long
# Arrow's GCS client may retry within it (by default it retries for minutes, silently: still
# nothing after 120 s here without credentials).
PROBE_S = 10.0
_GCS_PROBE_RETRY_S = 3

_PROBE = """
import sys
import pyarrow.fs as pafs
try:
    fs, path = pafs.FileSystem.from_uri(sys.argv[1])
    fs.get_file_info(path)
except Exception as exc:
    lines = str(exc).strip().splitlines()
    print(f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": "))
    sys.exit(1)
"""


def unreachable(uri: str, seconds: float = PROBE_S) -> str | None:
    """Why the store behind ``uri`` does not answer (one line: unreachable, unauthorised, no
    such bucket, no answer within ``seconds``), or None when it does.

    The look runs in a child process: whatever the store's client does (retries for
    minutes, prints to the terminal, runs a credential helper, aborts) stays there and ends
    with it, so every scheme pyarrow takes is answered in bounded time."""
    if uri.lower().startswith(("gs://", "gcs://")) and "retry_limit_seconds=" not in uri:
        uri += ("&" if "?" in uri else "?") + f"retry_limit_seconds={_GCS_PROBE_RETRY_S}"
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, uri], capture_output=True,
                              text=True, timeout=seconds, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"no answer within {seconds:g} s"
    if proc.returncode == 0:
        return None
    lines = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    return lines[-1] if lines else f"its client failed (exit code {proc.returncode})"


def exists(path: str) -> bool:
    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_nonempty_dir(path: str) -> bool:
    fs, p = _fs(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return False
    return bool(fs.get_file_info(pafs.FileSelector(p, recursive=False)))


def _names(path: str, kind: pafs.FileType) -> list[str]:
    fs, p = _fs(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    return sorted(i.base_name for i in infos if i.type == kind)


def list_dirs(path: str) -> list[str]:
    """Names of the sub-directories of ``path`` (empty when it does not exist)."""
    return _names(path, pafs.FileType.Directory)


def list_files(path: str) -> list[str]:
    """Names of the files directly in ``path`` (empty when it does not exist)."""
    return _names(path, pafs.FileType.File)


def delete_file(path: str) -> None:
    fs, p = _fs(path)
    if fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)


def delete_dir(path: str) -> None:
    fs, p = _fs(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def write_bytes(path: str, data: bytes) -> None:
    write_object(*_fs(path), data)


def link_or_copy(source: str, target: str) -> None:
    """A hard link on a local disk (no bytes written), a copy elsewhere."""
    if not is_uri(source) and not is_uri(target):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another filesystem, or links not allowed: copy
    write_bytes(target, read_bytes(source))


def read_bytes(path: str) -> bytes:
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, json_bytes(obj))


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))
