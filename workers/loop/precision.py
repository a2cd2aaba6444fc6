"""``train.precision``: a forward pass (and its loss) under autocast, its outputs in float32."""

from __future__ import annotations

from typing import Any

import torch

from workers.loop.batches import Batches


def autocast(device: torch.device, precision: str) -> Any:
    """bf16 mixed precision for a forward pass (and the loss): matmuls and convolutions in
    bfloat16, the parameters untouched (float32 master weights)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")



def as_float32(obj: Any) -> Any:
    """Outputs of an autocast forward, in float32: losses and metrics are computed on these."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() and obj.dtype != torch.float64 else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(as_float32(o) for o in obj)
    if isinstance(obj, dict):
        return {k: as_float32(v) for k, v in obj.items()}
    return obj



def forward_loss(model: torch.nn.Module, batches: Batches, x: Any, y: Any,
                 device: torch.device, precision: str) -> tuple[Any, torch.Tensor]:
    """(the output in float32, the batch's loss). The forward runs under autocast; a
    ``loss_fn`` runs after it, on the float32 output (backward leaves autocast, as it should);
    the model's own loss is computed inside its forward, so it comes out of autocast."""
    with autocast(device, precision):
        out = batches.forward(model, x)
        own = batches.loss(out, y) if batches.loss_fn is None else None
    out = as_float32(out)
    return out, own.float() if own is not None else batches.loss(out, y)
