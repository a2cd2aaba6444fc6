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

from workers.checkpoint.integrity import FILES_KEY, file_digest
from workers.checkpoint.snapshot import HostBuffers, Snapshot
from workers.compat import train_fn_utils, train_run_storage
from workers.contract.names import METADATA_FILE, MODEL_FILE, STATE_FILE
from workers.files import json_bytes, write_object


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _torch_weights(snap: Snapshot) -> bytes:
    # Views into one image would each pull the whole image into torch.save's file.
    weights = snap.weights if snap.image is None else {k: v.clone() for k, v in
                                                        snap.weights.items()}
    return torch_bytes(weights)


def write_checkpoint(snap: Snapshot, fs: pafs.FileSystem, path: str) -> None:
    """Write ``snap`` as the checkpoint directory ``path`` of a pyarrow filesystem: every
    model file and the train state, with their sizes and sha256 recorded in
    ``metadata.json``, written last."""
    model = snap.image.file_bytes() if snap.image is not None else safetensors_bytes(snap.weights)
    models: dict[str, Any] = {MODEL_FILE: model}
    if snap.torch_weights_file:
        models[snap.torch_weights_file] = _torch_weights(snap)
    state = torch_bytes(snap.train_state)
    snap.metadata[FILES_KEY] = {name: file_digest(data)
                                for name, data in [*models.items(), (STATE_FILE, state)]}
    if isinstance(fs, pafs.LocalFileSystem) and snap.image is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        snap.image.write(Path(path) / MODEL_FILE)  # one sequential (O_DIRECT) write
    else:
        write_object(fs, f"{path}/{MODEL_FILE}", model)
    rest = [*list(models.items())[1:], (STATE_FILE, state),
            (METADATA_FILE, json_bytes(snap.metadata))]  # metadata last: then it is complete
    for name, data in rest:
        write_object(fs, f"{path}/{name}", data)


class AsyncSaver:
    """Hands a snapshot to Ray's upload thread, which writes it straight into the run's
    storage; at most one save in flight. ``buffers``: the reused host memory for snapshots.

    ``wait`` returns once the latest snapshot's write has ended. A write that failed retires
    its memory before it ends (see ``write``), so whatever Ray retries keeps its own bytes.
    """

    def __init__(self) -> None:
        self.buffers = HostBuffers()
        self._done = threading.Condition()
        self._in_flight: Snapshot | None = None

    def wait(self) -> None:
        with self._done:
            self._done.wait_for(lambda: self._in_flight is None)

    def _ended(self, snap: Snapshot) -> None:
        with self._done:
            if self._in_flight is snap:  # a retried older write ending changes nothing
                self._in_flight = None
                self._done.notify_all()

    def report(self, metrics: dict[str, Any], snap: Snapshot, dir_name: str) -> None:
        import ray.train

        self.wait()
        storage = train_run_storage()
        fs = storage.filesystem
        if fs.get_file_info(storage.run_path).type != pafs.FileType.Directory:
            raise RuntimeError(
                f"storage_path: the run directory {storage.run_path} is not visible "
                "from this node; a multi-node cluster needs shared or cloud storage"
            )

        def write(_: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
            try:
                path = storage.checkpoint_path(name)
                write_checkpoint(snap, fs, path)
                return ray.train.Checkpoint(path=path, filesystem=fs)
            except BaseException:
                # Ray may call this again for the same epoch (it retries uploads that failed
                # on a transient object-store error) while training goes on: the next
                # snapshot must not be copied into the memory this one is written from.
                self.buffers.retire(snap.image)
                raise
            finally:
                self._ended(snap)

        with self._done:
            self._in_flight = snap
        try:
            # The checkpoint passed here is only handed to ``write``: nothing is staged, so
            # there is no local copy for Ray to delete (by default it would delete this path).
            train_fn_utils().report(
                metrics,
                checkpoint=ray.train.Checkpoint(
                    path=storage.checkpoint_path(dir_name), filesystem=fs),
                checkpoint_dir_name=dir_name,
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                checkpoint_upload_fn=write,
                delete_local_checkpoint_after_upload=False,
            )
        except BaseException:
            self._ended(snap)  # nothing was handed over
            raise
