"""Checkpoint files: snapshot on the training thread, write and upload off it.

A checkpoint directory holds:
- ``model.safetensors``: the unwrapped model's weights (no pickle, no code);
- ``train_state.pt``: epoch, tracker state and seed, plus the optimizer state in full-state
  (resume) checkpoints; loadable with ``torch.load(weights_only=True)``;
- ``metadata.json``: the epoch, every metric of that epoch, monitor, mode, is_best, the
  run's config and seed;
- optionally (the fastai engine's improvements) ``learner.pth``: the same weights as a
  ``torch.save``'d state dict, the format of fastai's ``learn.save``, so that ``learn.load``
  reads it (and so does ``torch.load(weights_only=True)``).

``snapshot`` copies tensors into host memory (the only part that blocks training): the
weights into an image of ``model.safetensors`` that is allocated once and reused
(``weights_image``), so a save costs one memory copy (copying into fresh memory costs
several times more: the kernel maps every new page). ``write_checkpoint`` writes that copy
straight into storage, each local file atomically.
``AsyncSaver`` runs the write in Ray's upload thread (``checkpoint_upload_fn`` with
``CheckpointUploadMode.ASYNC``), with at most one save in flight: the buffers are reused
only after the previous write finished.
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

import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file as safetensors_file

from workers.weights_image import WeightsImage

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


class HostBuffers:
    """Host memory for the weights' snapshot: a ``WeightsImage``, allocated on first use and
    reused while the model's tensors keep their names, dtypes and shapes.

    Reuse is safe only once the previous snapshot's write has finished (``AsyncSaver.wait``).
    """

    def __init__(self) -> None:
        self.image: WeightsImage | None = None

    def prepare(self, tensors: dict[str, torch.Tensor]) -> WeightsImage | None:
        """Allocate (and fault in) the image for ``tensors`` if it is not there; None for
        dtypes the image does not cover (the caller then makes fresh copies)."""
        if not WeightsImage.supports(tensors):
            return None
        if self.image is None or not self.image.fits(tensors):
            self.image = WeightsImage(tensors, pin=any(t.is_cuda for t in tensors.values()))
        return self.image

    def copy(self, tensors: dict[str, torch.Tensor]) -> WeightsImage | None:
        """The image holding a copy of ``tensors`` (see ``prepare``)."""
        image = self.prepare(tensors)
        if image is not None:
            image.copy_from(tensors)
        return image


@dataclass
class Snapshot:
    weights: dict[str, torch.Tensor]  # host copies (views into ``image`` when there is one)
    train_state: dict[str, Any]
    metadata: dict[str, Any]
    torch_weights_file: str | None = None  # also write ``weights`` with torch.save under this
    image: WeightsImage | None = None  # ``weights`` as the bytes of model.safetensors


def snapshot(
    model: torch.nn.Module,
    optimizer: Any,
    train_state: dict[str, Any],
    metadata: dict[str, Any],
    torch_weights_file: str | None = None,
    buffers: HostBuffers | None = None,
) -> Snapshot:
    """``optimizer``: anything with ``state_dict()`` (a torch optimizer, or an adapter), or
    None for a checkpoint without optimizer state. ``buffers``: reused host memory for the
    weights (default: fresh copies)."""
    weights = model.state_dict()
    image = buffers.copy(weights) if buffers is not None else None
    host = (image.views if image is not None
            else {k: v.contiguous() for k, v in _to_host(weights).items()})
    state = dict(train_state)
    if optimizer is not None:
        state["optimizer"] = _to_host(optimizer.state_dict())
    return Snapshot(host, state, metadata, torch_weights_file, image)


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_safetensors(weights: dict[str, torch.Tensor], path: Path) -> None:
    """Atomically, with safetensors' own writer (which writes from the tensors' memory)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        safetensors_file(weights, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _torch_weights(snap: Snapshot) -> bytes:
    # Views into one image would each pull the whole image into torch.save's file.
    weights = snap.weights if snap.image is None else {k: v.clone() for k, v in
                                                        snap.weights.items()}
    return torch_bytes(weights)


def write_checkpoint_dir(snap: Snapshot, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if snap.image is not None:
        snap.image.write(directory / MODEL_FILE)
    else:
        write_safetensors(snap.weights, directory / MODEL_FILE)
    if snap.torch_weights_file:
        atomic_write_bytes(directory / snap.torch_weights_file, _torch_weights(snap))
    atomic_write_bytes(directory / STATE_FILE, torch_bytes(snap.train_state))
    # metadata last: a directory with metadata.json is complete.
    atomic_write_json(directory / METADATA_FILE, snap.metadata)


def write_checkpoint(snap: Snapshot, fs: pafs.FileSystem, path: str) -> None:
    """Write ``snap`` as the checkpoint directory ``path`` of a pyarrow filesystem: a local
    one atomically file by file, an object store as whole objects (metadata last)."""
    if isinstance(fs, pafs.LocalFileSystem):
        write_checkpoint_dir(snap, Path(path))
        return
    files: dict[str, Any] = {MODEL_FILE: snap.image.file_bytes() if snap.image is not None
                             else safetensors_bytes(snap.weights)}
    if snap.torch_weights_file:
        files[snap.torch_weights_file] = _torch_weights(snap)
    files[STATE_FILE] = torch_bytes(snap.train_state)
    files[METADATA_FILE] = (json.dumps(snap.metadata, indent=2, allow_nan=True) + "\n").encode()
    fs.create_dir(path, recursive=True)
    for name, data in files.items():
        with fs.open_output_stream(f"{path}/{name}") as out:
            out.write(data)


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / MODEL_FILE))


def load_train_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, weights_only=True, map_location="cpu")


def load_metadata(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / METADATA_FILE).read_text())


class AsyncSaver:
    """Hands a snapshot to Ray's upload thread, which writes it straight into the run's
    storage; at most one save in flight. ``buffers``: the reused host memory for snapshots."""

    def __init__(self) -> None:
        self.buffers = HostBuffers()
        self._idle = threading.Event()
        self._idle.set()

    def wait(self) -> None:
        self._idle.wait()

    def report(self, metrics: dict[str, Any], snap: Snapshot, dir_name: str) -> None:
        import ray.train

        self.wait()
        storage = ray.train.get_context().get_storage()
        fs = storage.storage_filesystem
        if fs.get_file_info(storage.experiment_fs_path).type != pafs.FileType.Directory:
            raise RuntimeError(
                f"storage_path: the run directory {storage.experiment_fs_path} is not visible "
                "from this node; a multi-node cluster needs shared or cloud storage"
            )

        def write(_: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
            try:
                path = storage.build_checkpoint_path_from_name(name)
                write_checkpoint(snap, fs, path)
                return ray.train.Checkpoint(path=path, filesystem=fs)
            finally:
                self._idle.set()

        self._idle.clear()
        try:
            # The checkpoint passed here is only handed to ``write``: nothing is staged, so
            # there is no local copy for Ray to delete (by default it would delete this path).
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint(
                    path=storage.build_checkpoint_path_from_name(dir_name), filesystem=fs),
                checkpoint_dir_name=dir_name,
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                checkpoint_upload_fn=write,
                delete_local_checkpoint_after_upload=False,
            )
        except BaseException:
            self._idle.set()  # nothing was handed over
            raise
