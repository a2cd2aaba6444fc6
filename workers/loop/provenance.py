"""Where a run's model came from: the code, the packages and the data (``provenance`` in
``summary.json``, every ``metadata.json`` and the W&B run).

Computed once per command, on the driver, from the workload it builds anyway
(``orchestrator/training/datasets.py``), or, for a search, in the probe that builds it on a Ray
worker (``loop/probe.py``); the workers only copy it into each checkpoint's metadata. Nothing
here reads an environment variable: provenance never holds a secret.

- ``code``: the git commit, whether the work tree differs from it (``git diff HEAD``) and a
  sha256 of that diff, where the workload's module (or the working directory) is inside a
  repository (all null where git or a repository is absent); always a sha256 of the workload
  module's source file and the project's version.
- ``packages``: Python, torch, Ray, W&B; fastai, transformers and torchmetrics where the
  process that built the workload had imported them; CUDA and the GPU model where the run
  uses GPUs.
- ``data``: per split, a map-style dataset's length and a sha256 of a fixed, seeded sample of
  its items (``SAMPLE_SIZE`` indices drawn with ``SAMPLE_SEED``, whatever the run's seed); a
  Ray Dataset's input files (size, modification time), schema and row count where known
  without reading the data; a stream (``IterableDataset``) cannot be fingerprinted without
  consuming it: null, with the reason.

``changes`` compares two provenances (a ``--resume``'s with the run's earlier one).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from workers.loop.iterable import is_iterable
from workers.loop.ray_data import SPLITS, is_ray_dataset

SAMPLE_SIZE = 32  # items hashed per map-style split
SAMPLE_SEED = 0  # fixed: the same data gives the same fingerprint whatever the run's seed
PROJECT = "ray-best-model-orchestrator"  # the distribution name (pyproject.toml)
ALWAYS = ("torch", "ray", "wandb")
IF_IMPORTED = ("fastai", "transformers", "torchmetrics")
GIT_TIMEOUT_S = 10


def provenance(entrypoint: str, workload: Any, *, use_gpu: bool,
               rows: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The whole record. ``rows``: Ray Dataset splits' row counts already known (the driver
    counted them from the files' metadata), so nothing is read twice."""
    return {"code": code_fingerprint(entrypoint), "packages": package_versions(use_gpu),
            "data": data_fingerprint(workload, rows)}


# -- code --------------------------------------------------------------------------------------
def module_file(entrypoint: str) -> str | None:
    """The source file of the ``module:function`` entrypoint's module (None: not a file)."""
    name = entrypoint.split(":", 1)[0]
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None) if module is not None else None
    if origin is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        origin = spec.origin if spec is not None else None
    return origin if origin and os.path.isfile(origin) else None


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _git(cwd: str, *args: str) -> bytes | None:
    """A git command's output, or None (no git, not a repository, an error, too slow)."""
    try:
        done = subprocess.run(["git", "-C", cwd, *args], capture_output=True,
                              timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(where: str) -> dict[str, Any]:
    """``commit``, ``dirty`` and ``diff_sha256`` (of ``git diff HEAD``: tracked files only;
    null when clean) of the repository holding ``where``; all null outside one."""
    state: dict[str, Any] = {"git_commit": None, "dirty": None, "diff_sha256": None}
    commit = _git(where, "rev-parse", "HEAD")
    if commit is None:
        return state
    diff = _git(where, "diff", "HEAD", "--no-ext-diff", "--binary")
    state["git_commit"] = commit.decode().strip()
    if diff is not None:
        state["dirty"] = bool(diff)
        state["diff_sha256"] = hashlib.sha256(diff).hexdigest() if diff else None
    return state


def project_version() -> str | None:
    try:
        return importlib.metadata.version(PROJECT)
    except importlib.metadata.PackageNotFoundError:  # shipped with --working-dir, not installed
        return None


def code_fingerprint(entrypoint: str) -> dict[str, Any]:
    source = module_file(entrypoint)
    where = str(Path(source).parent) if source else os.getcwd()
    return {
        "entrypoint": entrypoint,
        **git_state(where),
        "module_file": source,
        "module_sha256": sha256_file(source) if source else None,
        "project_version": project_version(),
    }


# -- packages ----------------------------------------------------------------------------------
def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        module = sys.modules.get(name)
        return getattr(module, "__version__", None)


def package_versions(use_gpu: bool) -> dict[str, Any]:
    """Versions of what trains the model; CUDA and the GPU as this process sees them."""
    out: dict[str, Any] = {"python": platform.python_version()}
    out.update({name: _version(name) for name in ALWAYS})
    out.update({name: _version(name) for name in IF_IMPORTED if name in sys.modules})
    if use_gpu:
        import torch

        out["cuda"] = torch.version.cuda
        out["gpu"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return out


# -- data --------------------------------------------------------------------------------------
class ItemHasher:
    """A sha256 over items of any shape: tensors and arrays by dtype, shape and bytes;
    tuples, lists and mappings by their parts; Python scalars and strings by type and repr;
    objects with ``tobytes()`` (PIL images) by type and bytes; anything else by its type alone
    (``notes`` names those types: their contents do not reach the hash)."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.type_only: set[str] = set()

    def feed(self, tag: str, payload: bytes = b"") -> None:
        self.digest.update(f"{tag}:{len(payload)}:".encode())
        self.digest.update(payload)

    def add(self, item: Any) -> None:
        import numpy as np
        import torch

        if isinstance(item, torch.Tensor):
            t = item.detach().cpu().contiguous()
            self.feed(f"tensor:{t.dtype}:{tuple(t.shape)}",
                      t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(item, np.ndarray) and item.dtype != object:
            self.feed(f"ndarray:{item.dtype.str}:{item.shape}",
                      np.ascontiguousarray(item).tobytes())
        elif isinstance(item, np.generic):
            self.feed(f"npscalar:{item.dtype.str}", item.tobytes())
        elif item is None or isinstance(item, (bool, int, float, complex, str, bytes)):
            self.feed(type(item).__name__, repr(item).encode())
        elif isinstance(item, (tuple, list)) or (isinstance(item, np.ndarray)):
            self.feed(f"{type(item).__name__}[{len(item)}]")
            for part in item:
                self.add(part)
        elif isinstance(item, Mapping):
            self.feed(f"mapping[{len(item)}]")
            for key in sorted(item, key=repr):
                self.add(key)
                self.add(item[key])
        elif callable(getattr(item, "tobytes", None)):
            try:
                payload = item.tobytes()
            except Exception:  # noqa: BLE001 - a tobytes that needs arguments: by type
                payload = None
            if isinstance(payload, bytes):
                self.feed(f"{type(item).__module__}.{type(item).__qualname__}:"
                          f"{getattr(item, 'mode', '')}:{getattr(item, 'size', '')}", payload)
            else:
                self._by_type(item)
        else:
            self._by_type(item)

    def _by_type(self, item: Any) -> None:
        name = f"{type(item).__module__}.{type(item).__qualname__}"
        self.type_only.add(name)
        self.feed(f"type:{name}")


def sample_indices(length: int) -> list[int]:
    """The fixed sample: ``SAMPLE_SIZE`` indices (all of a smaller split), in order."""
    return sorted(random.Random(SAMPLE_SEED).sample(range(length), min(SAMPLE_SIZE, length)))


@contextmanager
def seeded_random_state(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's (CPU) global random state seeded with ``seed`` inside,
    and given back as it was after: a split whose items are randomly augmented
    (``RandomCrop`` in ``__getitem__``) reads the same sample in the run and in its resume,
    and the caller's own random sequence does not move."""
    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def map_fingerprint(dataset: Any) -> dict[str, Any]:
    try:
        length = len(dataset)
    except Exception as exc:  # noqa: BLE001 - a dataset without a length
        return {"kind": "map", "length": None, "sha256": None,
                "reason": f"len() failed ({type(exc).__name__})"}
    hasher = ItemHasher()
    indices = sample_indices(length)
    hasher.feed(f"length:{length}")
    try:
        with seeded_random_state(SAMPLE_SEED):  # random augmentations give the same items
            for index in indices:
                hasher.feed(f"index:{index}")
                hasher.add(dataset[index])
    except Exception as exc:  # noqa: BLE001 - the run's own loaders will say what is wrong
        return {"kind": "map", "length": length, "sha256": None,
                "reason": f"item {index} could not be read ({type(exc).__name__})"}
    out: dict[str, Any] = {"kind": "map", "length": length, "sample": len(indices),
                           "sample_seed": SAMPLE_SEED, "sha256": hasher.digest.hexdigest()}
    if hasher.type_only:
        out["note"] = ("hashed by type only, contents not fingerprinted: "
                       + ", ".join(sorted(hasher.type_only)))
    return out


def file_infos(paths: list[str], fs: Any = None) -> list[dict[str, Any]]:
    """Each input file with its size and modification time (ISO 8601), where the
    filesystem (``fs``, else the path's own) says (an object store's ETag is not exposed by
    pyarrow: not recorded)."""
    import pyarrow.fs as pafs

    out = []
    for path in paths:
        entry: dict[str, Any] = {"path": path, "size": None, "mtime": None}
        try:
            if fs is not None:
                filesystem, inner = fs, path
            elif "://" in path:
                filesystem, inner = pafs.FileSystem.from_uri(path)
            else:
                filesystem, inner = pafs.LocalFileSystem(), os.path.abspath(path)
            info = filesystem.get_file_info(inner)
            if info.type != pafs.FileType.NotFound:
                entry["size"] = info.size
                entry["mtime"] = info.mtime.isoformat() if info.mtime else None
        except Exception:  # noqa: BLE001 - a path its filesystem cannot be found for
            pass
        out.append(entry)
    return out


def input_files(dataset: Any) -> tuple[list[str], Any]:
    """The files a Ray Dataset reads, listed (not read), and their pyarrow filesystem (None:
    each path's own): ``input_files()`` where Ray knows them, else the read's own paths
    expanded as Ray expands them (a folder: the files under it with the read's extensions,
    hidden ones left out)."""
    import pyarrow.fs as pafs

    from workers.compat import listed_read_paths

    try:
        known = list(dataset.input_files())
    except Exception:  # noqa: BLE001 - a dataset made in memory has none
        known = []
    listed = listed_read_paths(dataset) if not known else None
    if not listed:
        return sorted(known), None
    paths, fs, extensions = listed
    files = []
    for path in paths:
        try:
            filesystem, inner = (fs, path) if fs is not None else pafs.FileSystem.from_uri(path)
            info = filesystem.get_file_info(inner)
            if info.type == pafs.FileType.Directory:
                found = filesystem.get_file_info(pafs.FileSelector(inner, recursive=True))
                files += [f.path for f in found if f.type == pafs.FileType.File
                          and not f.base_name.startswith((".", "_"))
                          and (not extensions or f.extension in extensions)]
            else:
                files.append(inner)
        except Exception:  # noqa: BLE001 - a path its filesystem cannot list: as given
            files.append(path)
    return sorted(files), fs


def ray_dataset_fingerprint(dataset: Any, rows: int | None) -> dict[str, Any]:
    """Nothing read: the input files (sizes, modification times), the schema where the plan
    knows it, the row count where the driver counted it (from the files' metadata)."""
    try:
        schema = dataset.schema(fetch_if_missing=False)
    except Exception:  # noqa: BLE001
        schema = None
    files, fs = input_files(dataset)
    return {"kind": "ray_dataset", "files": file_infos(files, fs),
            "schema": ({n: str(t) for n, t in zip(schema.names, schema.types, strict=True)}
                       if schema is not None else None),
            "rows": rows,
            **({} if rows is not None else {"note": "rows not counted (not read twice)"})}


def data_fingerprint(workload: Any,
                     rows: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Each split's fingerprint, by name (``train``, ``val``, ``test``)."""
    out: dict[str, Any] = {}
    for split in SPLITS:
        dataset = getattr(workload, f"{split}_dataset", None)
        if dataset is None:
            continue
        if is_ray_dataset(dataset):
            out[split] = ray_dataset_fingerprint(dataset, (rows or {}).get(split))
        elif is_iterable(dataset):
            out[split] = {"kind": "iterable", "sha256": None,
                          "reason": "a stream (IterableDataset) is not read to fingerprint it"}
        else:
            out[split] = map_fingerprint(dataset)
    return out


# -- changes on a resume -----------------------------------------------------------------------
def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:12] + "…" if text and len(text) > 12 else str(text)


def changes(before: Mapping[str, Any] | None,
            after: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """What differs between two provenances in the code (the workload's module, the git commit,
    the uncommitted diff) and the data (each split): ``[{what, before, after}]``. Packages are
    not compared (a resume on another machine is expected to differ there)."""
    if not before or not after:
        return []
    found = []
    code_b, code_a = before.get("code") or {}, after.get("code") or {}
    for key, what in (("module_sha256", "the workload's module"),
                      ("git_commit", "the git commit"),
                      ("diff_sha256", "the uncommitted changes (git diff HEAD)")):
        if code_b.get(key) != code_a.get(key):
            found.append({"what": what, "before": code_b.get(key), "after": code_a.get(key)})
    data_b, data_a = before.get("data") or {}, after.get("data") or {}
    for split in sorted(set(data_b) | set(data_a)):
        if data_b.get(split) != data_a.get(split):
            found.append({"what": f"the {split} data",
                          "before": _data_digest(data_b.get(split)),
                          "after": _data_digest(data_a.get(split))})
    return found


def _data_digest(split: Any) -> str | None:
    """A split's fingerprint as one sha256 (its own for a map-style split)."""
    if split is None:
        return None
    if split.get("sha256"):
        return str(split["sha256"])
    return hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()


def change_line(found: list[dict[str, Any]]) -> str:
    """One line for the terminal."""
    parts = [f"{c['what']} changed since the run started ({_short(c['before'])} -> "
             f"{_short(c['after'])})" for c in found]
    return "resume: " + "; ".join(parts) + "; continuing"
