"""``checkpoint.average_top_k``: the uniform average of the K best models' weights, and
whether it beats the single best. Pure: no I/O, no torch.distributed.

- Floating-point tensors are averaged uniformly, in float64, then cast back to their dtype.
- Every other tensor (BatchNorm's ``num_batches_tracked``, integer tables) is the best
  model's: an average of counters or indices means nothing.
- The average wins only when its value is finite and strictly better than the best's (a tie
  keeps the single best: the average must earn its place). A best that is not finite loses to
  any finite average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from workers.contract.records import Mode

if TYPE_CHECKING:  # the driver decides with ``average_wins`` and does not import torch
    import torch


def average_weights(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of ``states`` (the best first: its non-float tensors are kept).
    Every state must have the same names, shapes and dtypes."""
    import torch

    if not states:
        raise ValueError("average_weights: no states to average")
    best = states[0]
    for other in states[1:]:
        if other.keys() != best.keys():
            raise ValueError(f"average_weights: the states' tensors differ: "
                             f"{sorted(set(other) ^ set(best))[:5]}")
    averaged: dict[str, torch.Tensor] = {}
    for name, first in best.items():
        if not first.is_floating_point():
            averaged[name] = first.clone()
            continue
        total = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for state in states:
            if state[name].shape != first.shape:
                raise ValueError(f"average_weights: {name} has shapes {tuple(first.shape)} "
                                 f"and {tuple(state[name].shape)}")
            total += state[name].to(torch.float64)
        averaged[name] = (total / len(states)).to(first.dtype)
    return averaged


def average_wins(value: float, best_value: float, mode: Mode) -> bool:
    """The averaged model replaces the single best: strictly better, and finite."""
    if not math.isfinite(value):
        return False
    if not math.isfinite(best_value):
        return True
    return value > best_value if mode == "max" else value < best_value


def margin(value: float, best_value: float, mode: Mode) -> float:
    """How much better the average is than the best (negative: worse), in the monitor's
    units; NaN when either is not finite."""
    if not (math.isfinite(value) and math.isfinite(best_value)):
        return math.nan
    return value - best_value if mode == "max" else best_value - value
