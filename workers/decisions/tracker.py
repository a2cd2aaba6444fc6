"""The best-model tracker: pure decision logic, no I/O, no torch.distributed.

It lives on rank 0 only. Each evaluation it is given the global metrics (identical on every
rank) and answers two questions: did the monitored metric improve, and should training stop?
Its state round-trips through ``state_dict`` so that a resumed run never forgets how good its
best model was.

The best is the strictly best value seen (a tie is not an improvement); ``min_delta`` only
decides what counts as progress for patience, as in Lightning's and Keras' EarlyStopping and
transformers' EarlyStoppingCallback, while their checkpoints keep the strictly best model.

The thresholds follow their peers (docs/config.md names each): ``stop_at`` and ``divergence``
are Lightning's ``stopping_threshold`` and ``divergence_threshold`` (strict comparisons),
``baseline`` and ``start_from_epoch`` Keras' EarlyStopping's, ``initial_best`` Keras'
ModelCheckpoint ``initial_value_threshold``. With ``smoothing`` every decision (best, progress,
thresholds) is made on the smoothed value (``Smoother``); the record keeps both.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from workers.contract.config import RunConfig, monitor_mode
from workers.contract.records import SmootherState, TrackerState
from workers.contract.user_errors import UserInputError
from workers.decisions.top_k import TopK


class MonitorNotReportedError(UserInputError):
    """The monitored metric is not among the metrics the run reports (a config error)."""


@dataclass(frozen=True)
class Decision:
    improved: bool
    should_stop: bool
    best_epoch: int | None
    best_value: float | None
    value: float = math.nan  # what was decided on: the monitored value, smoothed if asked
    stop_reason: str | None = None  # one line, when should_stop
    # checkpoint.keep_top_k > 1: the evaluation's rank among the K best when it enters them
    # (decisions.top_k), else None. Always None with K = 1 (``improved`` says it all).
    top_k_rank: int | None = None


@dataclass
class Smoother:
    """``tracker.smoothing``: an exponential moving average (``ema``: the previous smoothed
    value's weight, s = ema * s + (1 - ema) * x, starting at the first value) or the mean of
    the last ``window`` values. Non-finite values are not taken in (a NaN would poison every
    later average): such an evaluation is decided on its raw value, which never improves."""

    ema: float | None = None
    window: int | None = None
    value: float | None = None
    recent: deque = field(default_factory=deque)

    def add(self, x: float) -> float:
        if not math.isfinite(x):
            return x
        if self.ema is not None:
            self.value = x if self.value is None else self.ema * self.value + (1 - self.ema) * x
            return self.value
        self.recent.append(x)
        while len(self.recent) > (self.window or 1):
            self.recent.popleft()
        return sum(self.recent) / len(self.recent)

    def state_dict(self) -> SmootherState:
        return {"ema": self.ema, "window": self.window, "value": self.value,
                "recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("ema") == self.ema and state.get("window") == self.window:
            self.value, self.recent = state["value"], deque(state["recent"])


class BestTracker:
    def __init__(
        self,
        monitor: str,
        mode: Literal["auto", "min", "max"] = "auto",
        min_delta: float = 0.0,
        patience: int | None = None,
        *,
        stop_at: float | None = None,
        divergence: float | None = None,
        baseline: float | None = None,
        start_from_epoch: int = 0,
        initial_best: float | None = None,
        smoothing: dict[str, Any] | None = None,
        top_k: int = 1,
    ) -> None:
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {patience}")
        self.monitor = monitor
        self.mode = monitor_mode(monitor, mode)
        self.min_delta = min_delta
        self.patience = patience
        self.stop_at, self.divergence, self.baseline = stop_at, divergence, baseline
        self.start_from_epoch, self.initial_best = start_from_epoch, initial_best
        self.smoother = Smoother(**smoothing) if smoothing else None
        # checkpoint.keep_top_k > 1: the K best evaluations so far (decided on ``value``).
        self.top_k = TopK(top_k, self.mode) if top_k > 1 else None
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
        """A new best model: strictly better than the best so far (min_delta plays no part),
        and than ``initial_best`` before any."""
        return self.beats(value, self.initial_best if self.best_value is None
                          else self.best_value)

    def update(self, epoch: int, metrics: dict[str, Any]) -> Decision:
        if self.monitor not in metrics:
            reported = ", ".join(sorted(k for k in metrics if k != "epoch"))
            raise MonitorNotReportedError(
                f"tracker.monitor: {self.monitor!r} is not reported by this run; "
                f"it reports: {reported}"
            )
        raw = float(metrics[self.monitor])
        value = self.smoother.add(raw) if self.smoother else raw
        improved = self.is_improvement(value)
        if epoch > self.start_from_epoch:  # before it, nothing counts for patience (Keras)
            if (self.beats(value, self.progress_value, self.min_delta)
                    and (self.baseline is None or self.beats(value, self.baseline,
                                                             self.min_delta))):
                self.progress_value = value
                self.epochs_without_improvement = 0
            else:
                self.epochs_without_improvement += 1
        if improved:
            self.best_value = value
            self.best_epoch = epoch
            self.best_metrics = {k: float(v) for k, v in metrics.items()}
            self.improvements += 1
        reason = self.stop_reason(value)
        return Decision(improved, reason is not None, self.best_epoch, self.best_value, value,
                        reason, self._offer_top_k(epoch, metrics, value))

    def _offer_top_k(self, epoch: int, metrics: dict[str, Any], value: float) -> int | None:
        """The evaluation's rank among the K best when it enters them: strictly better than
        the K-th best so far (and than ``initial_best``, as every saved model must be)."""
        if self.top_k is None or (self.initial_best is not None
                                  and not self.beats(value, self.initial_best)):
            return None
        step = metrics.get("global_step")
        return self.top_k.add(value, epoch, int(step) if step is not None else None)

    def stop_reason(self, value: float) -> str | None:
        """Why the run stops after this evaluation (one line), or None: the thresholds first,
        as Lightning checks them, then patience."""
        name = self.monitor + (" (smoothed)" if self.smoother else "")
        if self.stop_at is not None and self.beats(value, self.stop_at):
            return f"tracker.stop_at: {name} {value:.6g} reached {self.stop_at:g}"
        if self.divergence is not None and math.isfinite(value) and (
                value > self.divergence if self.mode == "min" else value < self.divergence):
            return f"tracker.divergence: {name} {value:.6g} is worse than {self.divergence:g}"
        if self.patience is not None and self.epochs_without_improvement >= self.patience:
            if self.baseline is not None:
                return (f"tracker.baseline: {name} did not beat {self.baseline:g} in "
                        f"{self.patience} evaluations (tracker.patience)")
            return (f"tracker.patience: {self.patience} evaluations without progress on "
                    f"{name}" + (f" by more than {self.min_delta:g}" if self.min_delta else ""))
        return None

    def state_dict(self) -> TrackerState:
        # Plain numbers and strings only: this goes into a weights_only torch file and JSON.
        state: TrackerState = {
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
            "smoother": self.smoother.state_dict() if self.smoother else None,
        }
        if self.top_k is not None:  # K = 1 writes no key: the state it always was
            state["top_k"] = [{**e} for e in self.top_k.entries]
        return state

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
        if self.smoother and state.get("smoother"):
            self.smoother.load_state_dict(state["smoother"])
        if self.top_k is not None:
            self.top_k.load(state.get("top_k") or self._best_as_top_k(state))

    @staticmethod
    def _best_as_top_k(state: dict[str, Any]) -> list[Any]:
        """A state saved without the K best (K was 1, or before it was kept): its best is all
        it knows of them."""
        if state.get("best_value") is None:
            return []
        step = (state.get("best_metrics") or {}).get("global_step")
        return [{"value": state["best_value"], "epoch": state["best_epoch"],
                 "global_step": int(step) if step is not None else None}]


def tracker_of(cfg: RunConfig) -> BestTracker:
    """The run's tracker, as ``tracker.*`` sets it."""
    t = cfg.tracker
    return BestTracker(t.monitor, t.mode, t.min_delta, t.patience, stop_at=t.stop_at,
                       divergence=t.divergence, baseline=t.baseline,
                       start_from_epoch=t.start_from_epoch, initial_best=t.initial_best,
                       smoothing=t.smoothing.model_dump(exclude_none=True) if t.smoothing
                       else None, top_k=cfg.checkpoint.keep_top_k)


def require_monitor(monitor: str, reported: Iterable[str]) -> None:
    """Refuse a ``tracker.monitor`` that the run does not report (the same on all ranks)."""
    names = sorted(reported)
    if monitor not in names:
        raise MonitorNotReportedError(
            f"tracker.monitor: {monitor!r} is not reported by this run; "
            f"it reports: {', '.join(names)}"
        )
