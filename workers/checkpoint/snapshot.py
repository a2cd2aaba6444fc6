"""The part of a save that blocks training: copying tensors into host memory.

The weights go into an image of ``model.safetensors`` that is allocated once and reused
(``weights_image``), so a save costs one memory copy (copying into fresh memory costs
several times more: the kernel maps every new page).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from workers.checkpoint.weights_image import WeightsImage


def to_host(obj: Any) -> Any:
    """A deep copy with every tensor in host memory, detached from later in-place updates."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
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

    def retire(self, image: WeightsImage | None) -> None:
        """Never reuse ``image``: a write of it failed and may be retried (Ray retries an
        upload), so its bytes must stay those of its epoch; the next snapshot gets new memory."""
        if image is not None and self.image is image:
            self.image = None

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
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    train_state: Mapping[str, Any],
    metadata: Mapping[str, Any],
    torch_weights_file: str | None = None,
    buffers: HostBuffers | None = None,
) -> Snapshot:
    """``weights``: the model's state dict (``ModelState.weights``); ``optimizer_state``: an
    optimizer's state dict, or None for a checkpoint without optimizer state. ``buffers``:
    reused host memory for the weights (default: fresh copies)."""
    image = buffers.copy(weights) if buffers is not None else None
    host = (image.views if image is not None
            else {k: v.contiguous() for k, v in to_host(weights).items()})
    state = dict(train_state)
    if optimizer_state is not None:
        state["optimizer"] = to_host(optimizer_state)
    return Snapshot(host, state, dict(metadata), torch_weights_file, image)
