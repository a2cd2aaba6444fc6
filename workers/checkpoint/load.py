"""Reading a checkpoint back: nothing here can run code from the files, and nothing is
trusted before its recorded size and sha256 are checked (``integrity``)."""

from __future__ import annotations

import io
import json
import pickle
import posixpath
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from workers.checkpoint.integrity import damage, newest_intact
from workers.contract.names import (
    CHECKPOINT_PREFIX,
    METADATA_FILE,
    MODEL_FILE,
    STATE_FILE,
    point,
)
from workers.contract.records import CheckpointMetadata
from workers.contract.user_errors import UserInputError


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / MODEL_FILE))


def load_train_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, weights_only=True, map_location="cpu")


def load_metadata(directory: str | Path) -> CheckpointMetadata:
    return json.loads((Path(directory) / METADATA_FILE).read_text())


def load_checkpoint_metadata(checkpoint: Any) -> dict[str, Any]:
    """The metadata of ``checkpoint`` (a ``ray.train.Checkpoint``, on any storage)."""
    return json.loads(_read(checkpoint.filesystem, f"{checkpoint.path}/{METADATA_FILE}"))


def _read(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _check(fs: Any, path: str) -> str | None:
    try:
        metadata = json.loads(_read(fs, f"{path}/{METADATA_FILE}"))
    except (OSError, ValueError):
        return f"{METADATA_FILE} is missing or not JSON"
    return damage(metadata, lambda name: _read(fs, f"{path}/{name}"))


def _siblings(fs: Any, path: str) -> list[tuple[tuple[int, int], str]]:
    """(point, path) of the other checkpoints in the same run directory."""
    import pyarrow.fs as pafs

    parent = posixpath.dirname(path.rstrip("/"))
    found = []
    for info in fs.get_file_info(pafs.FileSelector(parent, recursive=False)):
        if (info.type != pafs.FileType.Directory or info.path.rstrip("/") == path.rstrip("/")
                or not info.base_name.startswith(CHECKPOINT_PREFIX)):
            continue
        try:
            found.append((point(json.loads(_read(fs, f"{info.path}/{METADATA_FILE}"))),
                          info.path))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an upload that never finished: not a candidate
    return found


def load_intact(checkpoint: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """Weights and train state of ``checkpoint`` (a ``ray.train.Checkpoint``) or, when its
    files do not match their recorded digests, of the newest intact checkpoint beside it.
    Returns (weights, train state, what was found damaged); no intact one: a user error."""
    fs, path = checkpoint.filesystem, checkpoint.path
    problem = _check(fs, path)
    damaged: list[str] = []
    if problem is not None:
        chosen, others = newest_intact(_siblings(fs, path), lambda p: _check(fs, p))
        damaged = [f"{path}/{problem}", *others]
        if chosen is None:
            raise UserInputError(
                f"--resume: no intact checkpoint to resume from ({'; '.join(damaged)}); "
                "start afresh with --overwrite")
        path = chosen
    weights = load_safetensors(_read(fs, f"{path}/{MODEL_FILE}"))
    try:  # weights_only: a pickle that would run code is refused, never run
        state = torch.load(io.BytesIO(_read(fs, f"{path}/{STATE_FILE}")), weights_only=True,
                           map_location="cpu")
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserInputError(
            f"{path}/{STATE_FILE}: refused, it is not plain tensors and values (nothing in it "
            f"was run: {first[:120]}); resume from another checkpoint or start afresh with "
            "--overwrite") from None
    return weights, state, damaged
