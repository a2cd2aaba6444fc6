"""Checkpoint files: snapshot on the training thread, write and upload off it.

A checkpoint directory holds:
- ``model.safetensors``: the unwrapped model's weights (no pickle, no code);
- ``train_state.pt``: optimizer state, epoch and tracker state, loadable with
  ``torch.load(weights_only=True)``;
- ``metadata.json``: the epoch, every metric of that epoch, monitor, mode, is_best, the
  run's config and seed;
- optionally (the fastai engine's improvements) ``learner.pth``: the same weights as a
  ``torch.save``'d state dict, the format of fastai's ``learn.save``, so that ``learn.load``
  reads it (and so does ``torch.load(weights_only=True)``).

``snapshot`` copies tensors into host memory (the only part that blocks training);
``write_checkpoint_dir`` serializes that copy, each file atomically. ``AsyncSaver`` runs the
write and Ray's upload in Ray's upload thread (``checkpoint_upload_fn`` with
``CheckpointUploadMode.ASYNC``), with at most one save in flight.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
METADATA_FILE = "metadata.json"
LEARNER_FILE = "learner.pth"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


def _to_host(obj: Any) -> Any:
    """A deep copy with every tensor in host memory, detached from later in-place updates."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


@dataclass
class Snapshot:
    weights: dict[str, torch.Tensor]
    train_state: dict[str, Any]
    metadata: dict[str, Any]
    torch_weights_file: str | None = None  # also write ``weights`` with torch.save under this


def snapshot(
    model: torch.nn.Module,
    optimizer: Any,
    train_state: dict[str, Any],
    metadata: dict[str, Any],
    torch_weights_file: str | None = None,
) -> Snapshot:
    """``optimizer``: anything with ``state_dict()`` (a torch optimizer, or an adapter)."""
    weights = {k: v.contiguous() for k, v in _to_host(model.state_dict()).items()}
    state = {"optimizer": _to_host(optimizer.state_dict()), **train_state}
    return Snapshot(weights, state, metadata, torch_weights_file)


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_checkpoint_dir(snap: Snapshot, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / MODEL_FILE, safetensors_bytes(snap.weights))
    if snap.torch_weights_file:
        atomic_write_bytes(directory / snap.torch_weights_file, torch_bytes(snap.weights))
    atomic_write_bytes(directory / STATE_FILE, torch_bytes(snap.train_state))
    # metadata last: a directory with metadata.json is complete.
    atomic_write_json(directory / METADATA_FILE, snap.metadata)


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / MODEL_FILE))


def load_train_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, weights_only=True, map_location="cpu")


def load_metadata(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / METADATA_FILE).read_text())


class AsyncSaver:
    """Hands a snapshot to Ray's upload thread; at most one save in flight."""

    def __init__(self) -> None:
        self._idle = threading.Event()
        self._idle.set()

    def wait(self) -> None:
        self._idle.wait()

    def report(self, metrics: dict[str, Any], snap: Snapshot, dir_name: str) -> None:
        import ray.train

        self.wait()
        self._idle.clear()
        staging = Path(tempfile.mkdtemp(prefix="ckpt-"))
        storage = ray.train.get_context().get_storage()

        def write_and_upload(checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
            try:
                write_checkpoint_dir(snap, staging)
                return storage.persist_current_checkpoint(checkpoint, name)
            finally:
                self._idle.set()

        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(staging)),
            checkpoint_dir_name=dir_name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            checkpoint_upload_fn=write_and_upload,
        )
