"""The workload protocol's own types: what ``build(**params)``
returns, and the error for a workload that does not follow the protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.contract.user_errors import WorkloadError

__all__ = ["Workload", "WorkloadError"]


@dataclass
class Workload:
    model: torch.nn.Module
    train_dataset: Any
    val_dataset: Any
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    test_dataset: Any = None
    metrics: list[Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
