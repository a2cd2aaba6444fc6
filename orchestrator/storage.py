"""Run files on a local path or a pyarrow URI (s3://, gs://, file://), the same way.

Writes go through ``workers.files`` (atomic local files, whole objects on object stores).
"""

from __future__ import annotations

import json
import os
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
