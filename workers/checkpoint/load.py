"""Reading a checkpoint directory back: nothing here can run code from the files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from workers.names import METADATA_FILE, MODEL_FILE, STATE_FILE


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / MODEL_FILE))


def load_train_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, weights_only=True, map_location="cpu")


def load_metadata(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / METADATA_FILE).read_text())
