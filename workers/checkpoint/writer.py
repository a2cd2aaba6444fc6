"""Writing a snapshot as a checkpoint directory, off the training thread.

``write_checkpoint`` writes straight into storage: a local directory file by file
atomically, an object store as whole objects; ``metadata.json`` always last, so a directory
that has it is complete. ``AsyncSaver`` runs the write in Ray's upload thread
(``checkpoint_upload_fn`` with ``CheckpointUploadMode.ASYNC``), with at most one save in
flight: the snapshot's host buffers are reused only after the previous write finished.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file as safetensors_file

from workers.checkpoint.snapshot import HostBuffers, Snapshot
from workers.files import atomic_path, json_bytes, write_object
from workers.names import METADATA_FILE, MODEL_FILE, STATE_FILE


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _torch_weights(snap: Snapshot) -> bytes:
    # Views into one image would each pull the whole image into torch.save's file.
    weights = snap.weights if snap.image is None else {k: v.clone() for k, v in
                                                        snap.weights.items()}
    return torch_bytes(weights)


def _files(snap: Snapshot) -> dict[str, Any]:
    """Every file but the model's, in writing order (metadata last)."""
    files: dict[str, Any] = {}
    if snap.torch_weights_file:
        files[snap.torch_weights_file] = _torch_weights(snap)
    files[STATE_FILE] = torch_bytes(snap.train_state)
    files[METADATA_FILE] = json_bytes(snap.metadata)
    return files


def write_checkpoint(snap: Snapshot, fs: pafs.FileSystem, path: str) -> None:
    """Write ``snap`` as the checkpoint directory ``path`` of a pyarrow filesystem."""
    if isinstance(fs, pafs.LocalFileSystem):
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        if snap.image is not None:  # one sequential write of the reused image
            snap.image.write(directory / MODEL_FILE)
        else:
            with atomic_path(directory / MODEL_FILE) as tmp:
                safetensors_file(snap.weights, tmp)
    else:
        fs.create_dir(path, recursive=True)
        model = (snap.image.file_bytes() if snap.image is not None
                 else safetensors_bytes(snap.weights))
        write_object(fs, f"{path}/{MODEL_FILE}", model)
    for name, data in _files(snap).items():
        write_object(fs, f"{path}/{name}", data)


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
