"""Which way the monitored metric improves: ``tracker.mode`` resolved once, with its reason.

``auto`` takes the direction the metric's object declares (torchmetrics' ``higher_is_better``,
or the same attribute on a workload's own metric), else the table below of name words, matched
as whole words of the metric's name (``val_mse`` -> ``mse``; ``val_f1_macro`` -> ``f1``); a
name the table cannot place, or places both ways, is refused: guessing would keep the worst
model silently (Keras refuses such a name too). Pure: no torch, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from workers.contract.user_errors import UserInputError

Mode = Literal["min", "max"]

# Whole words of a metric's name (split at '_', '-', '.', spaces and case changes).
LOWER_IS_BETTER = frozenset({
    "loss", "error", "err", "mse", "rmse", "mae", "mape", "smape", "msle", "rmsle", "nll",
    "perplexity", "ppl", "wer", "cer", "mer", "wil", "ter", "eer", "distance", "divergence",
    "kld", "hinge", "brier", "fid", "kid", "lpips", "regret", "hamming", "cost",
})
HIGHER_IS_BETTER = frozenset({
    "accuracy", "acc", "f1", "fbeta", "auc", "auroc", "auprc", "roc",
    "precision", "recall", "sensitivity", "specificity", "mcc", "r2", "iou", "jaccard", "dice",
    "bleu", "rouge", "meteor", "chrf", "sacrebleu", "psnr", "ssim", "ndcg", "mrr", "map",
    "kappa", "similarity", "pearson", "spearman", "corrcoef", "score", "reward", "return",
    "explained", "hit",
})


@dataclass(frozen=True)
class Direction:
    """``mode``: min or max; ``source``: why (``set``, ``declared by ...``, ``by name ...``)."""

    mode: Mode
    source: str

    def describe(self, monitor: str) -> str:
        return f"monitor {monitor}, {self.mode} ({self.source})"


def name_words(name: str) -> list[str]:
    """``val_MeanSquaredError`` -> ``['val', 'mean', 'squared', 'error']``."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def by_name(name: str) -> Direction | None:
    """The table's direction for ``name``; None where it has no word of it, or words of both
    kinds. ``score`` alone is not enough beside a word of the other kind (``error_score``)."""
    words = name_words(name)
    lower = [w for w in words if w in LOWER_IS_BETTER]
    higher = [w for w in words if w in HIGHER_IS_BETTER]
    if lower and higher and set(higher) <= {"score"}:
        higher = []
    if bool(lower) == bool(higher):
        return None
    mode: Mode = "min" if lower else "max"
    return Direction(mode, f"by name: '{(lower or higher)[0]}' in {name}")


def resolve(monitor: str, mode: str, declared: Mapping[str, tuple[bool, str]] | None = None
            ) -> Direction:
    """``tracker.mode`` for ``monitor``. ``declared``: reported metric name -> (higher is
    better, the object that says so), for the metrics whose objects declare a direction."""
    if mode in ("min", "max"):
        return Direction(mode, "set by tracker.mode")  # type: ignore[arg-type]
    if declared and monitor in declared:
        higher, who = declared[monitor]
        return Direction("max" if higher else "min",
                         f"declared by {who}: higher_is_better={higher}")
    found = by_name(monitor)
    if found is None:
        raise UserInputError(
            f"tracker.mode: auto cannot tell whether {monitor} is better lower or higher (its "
            "metric declares no higher_is_better, and its name has no word of the table in "
            "docs/config.md#tracker, or words of both kinds); set tracker.mode: min or "
            "tracker.mode: max")
    return found
