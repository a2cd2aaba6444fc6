"""``train.ema_decay``: which of an evaluation's two scorings is the model (pure).

Every evaluation scores the raw weights and their exponential moving average over the whole
validation set. The better of the two on ``tracker.monitor`` is the evaluation's model: its
values go under the usual names (what the tracker decides on, what a save writes), and both
scorings stay in the record as ``<metric>_raw`` and ``<metric>_ema``. Every rank computes
the choice from identical values, so every rank chooses the same without a broadcast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

Weights = Literal["raw", "ema"]


def ema_wins(raw: float, ema: float, mode: Literal["min", "max"]) -> bool:
    """Whether the EMA's value is strictly better than the raw weights' (a tie keeps the raw
    weights; NaN and inf lose to anything, and never win)."""
    if not math.isfinite(ema):
        return False
    if not math.isfinite(raw):
        return True
    return ema < raw if mode == "min" else ema > raw


def better_weights(monitor: str, mode: Literal["min", "max"], raw: Mapping[str, float],
                   ema: Mapping[str, float]) -> Weights:
    """The winner on ``monitor``. A monitor the EMA's scoring lacks (a ``train_*`` metric:
    training runs on the raw weights only) keeps the raw weights."""
    if monitor not in ema:
        return "raw"
    return "ema" if ema_wins(float(raw[monitor]), float(ema[monitor]), mode) else "raw"


def with_both(raw: Mapping[str, float], ema: Mapping[str, float],
              winner: Weights) -> dict[str, float]:
    """One evaluation's values: ``raw``'s (the training loss, ``lr``), the winner's under the
    usual names, then each of ``ema``'s metrics twice more, as ``<name>_raw`` and
    ``<name>_ema``."""
    values = dict(raw)
    if winner == "ema":
        values.update(ema)
    for name in ema:
        values[f"{name}_raw"] = raw[name]
        values[f"{name}_ema"] = ema[name]
    return values


def alternates(values: Mapping[str, object]) -> set[str]:
    """The ``<metric>_raw`` and ``<metric>_ema`` copies ``with_both`` added to ``values``:
    each metric's two scorings, kept for the history and W&B. Neither is what training or the
    decision used (that is the usual name's value), so neither counts as a divergence, and
    the epoch line leaves them out."""
    return {f"{name}{kind}" for name in values for kind in ("_raw", "_ema")
            if f"{name}_raw" in values and f"{name}_ema" in values}


def chosen(values: Mapping[str, float]) -> dict[str, float]:
    """``values`` without the ``alternates``: the training loss and the chosen weights'
    metrics under their usual names."""
    skip = alternates(values)
    return {name: value for name, value in values.items() if name not in skip}
