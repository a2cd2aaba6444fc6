"""The best-model tracker: pure decision logic, no I/O, no torch.distributed.

It lives on rank 0 only. Each epoch it is given the epoch's global metrics (identical on
every rank) and answers two questions: did the monitored metric improve, and should
training stop (patience)? Its state round-trips through ``state_dict`` so that a resumed
run never forgets how good its best model was.

The best is the strictly best value seen (a tie is not an improvement); ``min_delta`` only
decides what counts as progress for patience, as in Lightning's and Keras' EarlyStopping and
transformers' EarlyStoppingCallback, while their checkpoints keep the strictly best model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from workers.contract.config import monitor_mode
from workers.contract.errors import UserInputError


class MonitorNotReportedError(UserInputError):
    """The monitored metric is not among the metrics the run reports (a config error)."""


@dataclass(frozen=True)
class Decision:
    improved: bool
    should_stop: bool
    best_epoch: int | None
    best_value: float | None


class BestTracker:
    def __init__(
        self,
        monitor: str,
        mode: Literal["auto", "min", "max"] = "auto",
        min_delta: float = 0.0,
        patience: int | None = None,
    ) -> None:
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {patience}")
        self.monitor = monitor
        self.mode = monitor_mode(monitor, mode)
        self.min_delta = min_delta
        self.patience = patience
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.best_metrics: dict[str, float] | None = None
        self.epochs_without_improvement = 0  # evaluations without progress (patience)
        self.improvements = 0
        # The value progress is measured from: the best when it last beat this by more than
        # min_delta (Lightning's and Keras' ``best_score`` of their EarlyStopping).
        self.progress_value: float | None = None

    def beats(self, value: float, reference: float | None, delta: float = 0.0) -> bool:
        """NaN and inf never beat anything; a finite value beats nothing yet."""
        if not math.isfinite(value):
            return False
        if reference is None:
            return True
        if self.mode == "min":
            return value < reference - delta
        return value > reference + delta

    def is_improvement(self, value: float) -> bool:
        """A new best model: strictly better than the best so far (min_delta plays no part)."""
        return self.beats(value, self.best_value)

    def update(self, epoch: int, metrics: dict[str, Any]) -> Decision:
        if self.monitor not in metrics:
            reported = ", ".join(sorted(k for k in metrics if k != "epoch"))
            raise MonitorNotReportedError(
                f"tracker.monitor: {self.monitor!r} is not reported by this run; "
                f"it reports: {reported}"
            )
        value = float(metrics[self.monitor])
        improved = self.is_improvement(value)
        if self.beats(value, self.progress_value, self.min_delta):
            self.progress_value = value
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        if improved:
            self.best_value = value
            self.best_epoch = epoch
            self.best_metrics = {k: float(v) for k, v in metrics.items()}
            self.improvements += 1
        should_stop = (
            self.patience is not None and self.epochs_without_improvement >= self.patience
        )
        return Decision(improved, should_stop, self.best_epoch, self.best_value)

    def state_dict(self) -> dict[str, Any]:
        # Plain numbers and strings only: this goes into a weights_only torch file and JSON.
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "min_delta": self.min_delta,
            "patience": self.patience,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "epochs_without_improvement": self.epochs_without_improvement,
            "improvements": self.improvements,
            "progress_value": self.progress_value,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["monitor"] != self.monitor or state["mode"] != self.mode:
            # A resumed run that watches something else starts its record afresh.
            return
        self.best_value = state["best_value"]
        self.best_epoch = state["best_epoch"]
        self.best_metrics = state["best_metrics"]
        self.epochs_without_improvement = state["epochs_without_improvement"]
        self.improvements = state["improvements"]
        # A state saved before progress was kept apart: the best was where progress stood.
        self.progress_value = state.get("progress_value", self.best_value)
