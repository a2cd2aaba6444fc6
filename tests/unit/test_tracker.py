"""BestTracker: which epoch is the best one, when to stop, and what survives a resume."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from workers.decisions.tracker import BestTracker, MonitorNotReportedError

INF = math.inf
NAN = math.nan


def run(tracker: BestTracker, values: list[float]) -> list[bool]:
    """Feed the monitored values as epochs 1, 2, ...; return the ``improved`` flags."""
    return [
        tracker.update(epoch, {tracker.monitor: value}).improved
        for epoch, value in enumerate(values, start=1)
    ]


@pytest.mark.parametrize(
    ("monitor", "expected"),
    [
        ("val_loss", "min"),
        ("train_loss", "min"),
        ("val_error_rate", "min"),
        ("val_top1_error", "min"),
        ("VAL_LOSS", "min"),
        ("val_accuracy", "max"),
        ("val_mcc", "max"),
        ("val_f1_macro", "max"),
    ],
)
def test_auto_mode_from_the_metric_name(monitor: str, expected: str) -> None:
    assert BestTracker(monitor).mode == expected
    assert BestTracker(monitor, "auto").mode == expected


@pytest.mark.parametrize(
    ("monitor", "mode", "values", "improved"),
    [
        # auto
        ("val_loss", "auto", [1.0, 0.5, 0.75, 0.25], [True, True, False, True]),
        ("val_error_rate", "auto", [0.3, 0.4, 0.2], [True, False, True]),
        ("val_accuracy", "auto", [0.5, 0.25, 0.75], [True, False, True]),
        ("val_mcc", "auto", [-0.5, 0.0, -0.25, 0.5], [True, True, False, True]),
        # explicit mode wins over the name
        ("val_loss", "max", [1.0, 0.5, 2.0], [True, False, True]),
        ("val_accuracy", "min", [0.5, 0.75, 0.25], [True, False, True]),
        ("val_custom", "min", [3.0, 2.0, 2.5], [True, True, False]),
        ("val_custom", "max", [3.0, 2.0, 3.5], [True, False, True]),
    ],
)
def test_direction(monitor: str, mode: str, values: list[float], improved: list[bool]) -> None:
    assert run(BestTracker(monitor, mode), values) == improved  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "values", "improved"),
    [
        ("min", [1.0, 1.0], [True, False]),
        ("max", [1.0, 1.0], [True, False]),
        ("min", [0.5, 0.25, 0.25, 0.25], [True, True, False, False]),
        ("max", [0.0, 0.0], [True, False]),
        ("max", [-0.0, 0.0], [True, False]),
    ],
)
def test_ties_are_not_improvements(mode: str, values: list[float], improved: list[bool]) -> None:
    assert run(BestTracker("val_metric", mode), values) == improved  # type: ignore[arg-type]


# Values that are exact in binary floating point, so "exactly min_delta better" is exact.
# min_delta decides progress for patience only; the best model is the strictly best value, as
# Lightning's ModelCheckpoint, Keras' ModelCheckpoint and transformers' Trainer keep it.
@pytest.mark.parametrize(
    ("mode", "min_delta", "values", "improved", "best"),
    [
        ("max", 0.1, [0.80, 0.85], [True, True], 0.85),  # the case: 0.85 is kept
        ("min", 0.25, [1.0, 0.75], [True, True], 0.75),  # better by exactly min_delta
        ("min", 0.25, [1.0, 0.875, 0.5], [True, True, True], 0.5),
        ("max", 0.25, [1.0, 1.125, 1.5], [True, True, True], 1.5),
        ("min", 0.25, [1.0, 1.0], [True, False], 1.0),  # a tie never improves
        ("min", 0.25, [1.0, 2.0, 0.5], [True, False, True], 0.5),
    ],
)
def test_min_delta_never_decides_the_best_model(
    mode: str, min_delta: float, values: list[float], improved: list[bool], best: float
) -> None:
    tracker = BestTracker("val_metric", mode, min_delta=min_delta)  # type: ignore[arg-type]
    assert run(tracker, values) == improved
    assert tracker.best_value == best
    assert tracker.best_epoch == len(values) - improved[::-1].index(True)


# Patience counts evaluations without progress: an evaluation is progress when it beats the
# value of the last progress by more than min_delta (Lightning's EarlyStopping
# ``test_early_stopping_patience`` and Keras' ``test_EarlyStopping_reuse`` scenarios).
@pytest.mark.parametrize(
    ("mode", "min_delta", "patience", "values", "stop_after"),
    [
        ("min", 0.25, 2, [1.0, 0.875, 0.75], 3),  # small improvements are no progress
        ("min", 0.25, 2, [1.0, 0.875, 0.5], None),  # 0.5 beats 1.0 by more than 0.25
        ("min", 0.25, 2, [1.0, 0.5, 0.375, 0.25], 4),  # 0.25 beats 0.5 by exactly 0.25: no
        ("max", 0.1, 3, [0.5, 0.55, 0.59, 0.65], None),  # 0.65 beats 0.5 by 0.15
        ("max", 0.1, 3, [0.5, 0.55, 0.59, 0.58], 4),
        ("max", 0.0, 2, [0.5, 0.5, 0.5], 3),  # ties are no progress
    ],
)
def test_patience_counts_by_min_delta(
    mode: str, min_delta: float, patience: int, values: list[float], stop_after: int | None
) -> None:
    tracker = BestTracker("val_metric", mode, min_delta=min_delta,  # type: ignore[arg-type]
                          patience=patience)
    stops = [tracker.update(e, {"val_metric": v}).should_stop for e, v in enumerate(values, 1)]
    assert stops == [stop_after is not None and e >= stop_after
                     for e in range(1, len(values) + 1)]
    # Whatever patience decides, the best model is the strictly best value seen.
    assert tracker.best_value == (min(values) if mode == "min" else max(values))


def test_min_delta_progress_survives_a_resume() -> None:
    tracker = BestTracker("val_loss", "min", min_delta=0.25, patience=3)
    run(tracker, [1.0, 0.875])  # 0.875: a new best, but no progress
    resumed = BestTracker("val_loss", "min", min_delta=0.25, patience=3)
    resumed.load_state_dict(tracker.state_dict())
    assert resumed.best_value == 0.875 and resumed.epochs_without_improvement == 1
    assert resumed.update(3, {"val_loss": 0.8}).improved  # the best, still no progress
    assert resumed.update(4, {"val_loss": 0.79}).should_stop  # 3 without beating 1.0 - 0.25


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize(
    ("values", "improved", "best_epoch", "best_value"),
    [
        ([NAN], [False], None, None),
        ([INF], [False], None, None),
        ([-INF], [False], None, None),
        ([NAN, 0.5], [False, True], 2, 0.5),
        ([INF, 0.5], [False, True], 2, 0.5),
        ([-INF, 0.5], [False, True], 2, 0.5),
        ([NAN, INF, -INF, 0.5], [False, False, False, True], 4, 0.5),
        ([0.5, NAN], [True, False], 1, 0.5),
        ([0.5, INF], [True, False], 1, 0.5),
        ([0.5, -INF], [True, False], 1, 0.5),
        ([0.5, NAN, 0.5], [True, False, False], 1, 0.5),  # NaN does not reset the record
    ],
)
def test_non_finite_values_never_improve(
    mode: str,
    values: list[float],
    improved: list[bool],
    best_epoch: int | None,
    best_value: float | None,
) -> None:
    tracker = BestTracker("val_metric", mode)  # type: ignore[arg-type]
    assert run(tracker, values) == improved
    assert tracker.best_epoch == best_epoch
    assert tracker.best_value == best_value
    assert tracker.improvements == sum(improved)


@pytest.mark.parametrize(
    ("patience", "values", "stop_after"),
    [
        # stop_after: the 1-based epoch whose decision says should_stop (None: never)
        (1, [1.0, 2.0], 2),
        (1, [1.0, 0.5, 0.25], None),
        (2, [1.0, 2.0, 3.0], 3),
        (2, [1.0, 2.0, 0.5, 2.0, 3.0], 5),  # the counter restarts at the improvement
        (3, [1.0, 2.0, 2.0, 0.5, 2.0, 2.0, 2.0], 7),
        (3, [1.0, 1.0, 1.0, 1.0], 4),  # ties count as epochs without improvement
        (2, [NAN, NAN], 2),  # nothing finite at all: stop after N epochs all the same
        (2, [NAN, 1.0, NAN, NAN], 4),
        (None, [1.0] + [2.0] * 50, None),
    ],
)
def test_patience(patience: int | None, values: list[float], stop_after: int | None) -> None:
    tracker = BestTracker("val_loss", patience=patience)
    stops = [tracker.update(e, {"val_loss": v}).should_stop for e, v in enumerate(values, 1)]
    expected = [stop_after is not None and e >= stop_after for e in range(1, len(values) + 1)]
    assert stops == expected


def test_counter_resets_on_improvement() -> None:
    tracker = BestTracker("val_loss", patience=10)
    run(tracker, [1.0, 2.0, 3.0, 4.0])
    assert tracker.epochs_without_improvement == 3
    run(tracker, [0.5])
    assert tracker.epochs_without_improvement == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_delta": -0.1}, "min_delta"),
        ({"patience": 0}, "patience"),
        ({"patience": -3}, "patience"),
    ],
)
def test_invalid_settings(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BestTracker("val_loss", **kwargs)


def test_decision_fields() -> None:
    tracker = BestTracker("val_loss", patience=1)
    first = tracker.update(1, {"val_loss": 0.5})
    assert (first.improved, first.should_stop, first.best_epoch, first.best_value) == (
        True, False, 1, 0.5,
    )
    second = tracker.update(2, {"val_loss": 0.75})
    assert (second.improved, second.should_stop, second.best_epoch, second.best_value) == (
        False, True, 1, 0.5,
    )


EPOCHS = [
    {"epoch": 1, "train_loss": 2.0, "val_loss": 1.0, "val_accuracy": 0.5, "val_mcc": 0.1},
    {"epoch": 2, "train_loss": 1.5, "val_loss": 0.5, "val_accuracy": 0.75, "val_mcc": 0.6},
    {"epoch": 3, "train_loss": 1.0, "val_loss": 0.75, "val_accuracy": 0.875, "val_mcc": 0.7},
]


@pytest.mark.parametrize(
    ("monitor", "best_epoch"),
    [("val_loss", 2), ("train_loss", 3), ("val_accuracy", 3), ("val_mcc", 3)],
)
def test_best_metrics_are_every_metric_of_the_best_epoch(monitor: str, best_epoch: int) -> None:
    tracker = BestTracker(monitor)
    for metrics in EPOCHS:
        tracker.update(metrics["epoch"], metrics)
    assert tracker.best_epoch == best_epoch
    assert tracker.best_metrics == EPOCHS[best_epoch - 1]
    assert all(isinstance(v, float) for v in tracker.best_metrics.values())


def test_best_metrics_are_a_copy() -> None:
    tracker = BestTracker("val_loss")
    metrics = dict(EPOCHS[0])
    tracker.update(1, metrics)
    metrics["val_loss"] = 99.0
    assert tracker.best_metrics is not None and tracker.best_metrics["val_loss"] == 1.0


@pytest.mark.parametrize(
    ("metrics", "listed"),
    [
        ({"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5}, "train_loss, val_accuracy"),
        ({"epoch": 1, "val_mcc": 0.1, "train_loss": 1.0}, "train_loss, val_mcc"),
        ({"epoch": 1}, ""),
    ],
)
def test_monitor_not_reported(metrics: dict, listed: str) -> None:
    tracker = BestTracker("val_loss")
    with pytest.raises(MonitorNotReportedError) as info:
        tracker.update(1, metrics)
    message = str(info.value)
    assert message.startswith("tracker.monitor: 'val_loss' is not reported")
    assert message.endswith(f"it reports: {listed}")
    assert "epoch" not in message.split("it reports:")[1]
    assert isinstance(info.value, ValueError)
    assert tracker.best_value is None and tracker.epochs_without_improvement == 0


def _through_json(state: dict) -> dict:
    return json.loads(json.dumps(state, allow_nan=False))


def _through_torch(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "transport", [dict, _through_json, _through_torch], ids=["in_memory", "json", "torch"]
)
@pytest.mark.parametrize(
    ("monitor", "mode", "history", "worse", "better"),
    [
        ("val_loss", "auto", [1.0, 0.5, 0.75], 0.6, 0.4),
        ("val_accuracy", "auto", [0.5, 0.75, 0.625], 0.7, 0.8),
        ("val_mcc", "min", [0.5, 0.25, 0.375], 0.3, 0.2),
    ],
)
def test_state_round_trip(
    transport, monitor: str, mode: str, history: list[float], worse: float, better: float
) -> None:
    original = BestTracker(monitor, mode, min_delta=0.0, patience=5)  # type: ignore[arg-type]
    for epoch, value in enumerate(history, start=1):
        original.update(epoch, {"epoch": epoch, monitor: value, "train_loss": 1.0 / epoch})
    state = transport(original.state_dict())

    resumed = BestTracker(monitor, mode, min_delta=0.0, patience=5)  # type: ignore[arg-type]
    resumed.load_state_dict(state)
    assert resumed.state_dict() == original.state_dict()
    assert resumed.best_epoch == 2 and resumed.best_value == history[1]
    assert resumed.epochs_without_improvement == 1

    next_epoch = len(history) + 1
    decision = resumed.update(next_epoch, {monitor: worse})
    assert not decision.improved  # better than epoch 1 but worse than the remembered best
    assert decision.best_epoch == 2
    assert resumed.epochs_without_improvement == 2
    assert resumed.update(next_epoch + 1, {monitor: better}).improved


@pytest.mark.parametrize("transport", [_through_json, _through_torch], ids=["json", "torch"])
def test_state_round_trip_before_any_improvement(transport) -> None:
    original = BestTracker("val_loss", patience=3)
    run(original, [NAN, INF])
    resumed = BestTracker("val_loss", patience=3)
    resumed.load_state_dict(transport(original.state_dict()))
    assert resumed.best_value is None and resumed.best_metrics is None
    assert resumed.update(3, {"val_loss": NAN}).should_stop  # the count carried over
    assert resumed.update(4, {"val_loss": 5.0}).improved


def test_state_dict_holds_only_plain_values() -> None:
    tracker = BestTracker("val_loss", min_delta=0.01, patience=2)
    tracker.update(1, {"epoch": 1, "val_loss": torch.tensor(0.5).item()})
    state = tracker.state_dict()
    assert set(state) >= {"monitor", "mode", "best_value", "best_epoch", "best_metrics"}
    json.dumps(state, allow_nan=False)  # strict JSON: no NaN, no tensors
    assert _through_torch(state) == state


@pytest.mark.parametrize(
    ("saved", "resumed"),
    [
        (("val_loss", "auto"), ("val_accuracy", "auto")),
        (("val_loss", "min"), ("val_loss", "max")),
    ],
)
def test_state_for_another_monitor_starts_afresh(saved: tuple, resumed: tuple) -> None:
    old = BestTracker(*saved)
    old.update(1, {"val_loss": 0.5, "val_accuracy": 0.9})
    new = BestTracker(*resumed)
    new.load_state_dict(old.state_dict())
    assert new.best_value is None and new.best_epoch is None and new.improvements == 0
