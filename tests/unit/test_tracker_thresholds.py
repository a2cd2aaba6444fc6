"""The tracker's thresholds and smoothing (tracker.stop_at, divergence, baseline,
start_from_epoch, initial_best, smoothing), on the peers' own scenarios."""

from __future__ import annotations

import math

import pytest
import torch

from workers.decisions.tracker import BestTracker


def stopped_at(tracker: BestTracker, values: list[float]) -> int | None:
    """The 1-based evaluation after which the tracker stops (None: never)."""
    for epoch, value in enumerate(values, start=1):
        if tracker.update(epoch, {tracker.monitor: value}).should_stop:
            return epoch
    return None


# Lightning's tests/tests_pytorch/callbacks/test_early_stopping.py
# ``test_early_stopping_thresholds`` (EarlyStopping's default patience 3; its expected epoch
# is 0-based, ours 1-based).
@pytest.mark.parametrize(
    ("stop_at", "divergence", "losses", "expected"),
    [
        (None, None, [8, 4, 2, 3, 4, 5, 8, 10], 6),
        (2.9, None, [9, 8, 7, 6, 5, 6, 4, 3, 2, 1], 9),
        (None, 15.9, [9, 4, 2, 16, 32, 64], 4),
    ],
)
def test_lightnings_stopping_and_divergence_thresholds(stop_at, divergence, losses, expected):
    tracker = BestTracker("val_loss", "min", patience=3, stop_at=stop_at, divergence=divergence)
    assert stopped_at(tracker, losses) == expected


def test_thresholds_are_strict_and_say_why() -> None:
    tracker = BestTracker("val_accuracy", "max", stop_at=0.9, divergence=0.1)
    first = tracker.update(1, {"val_accuracy": 0.9})  # reaching it is not beating it
    assert not first.should_stop
    stop = tracker.update(2, {"val_accuracy": 0.91})
    assert stop.should_stop and stop.stop_reason == (
        "tracker.stop_at: val_accuracy 0.91 reached 0.9")
    low = BestTracker("val_accuracy", "max", divergence=0.1)
    assert low.update(1, {"val_accuracy": 0.05}).stop_reason == (
        "tracker.divergence: val_accuracy 0.05 is worse than 0.1")
    assert not BestTracker("val_loss", "min", divergence=1.0).update(
        1, {"val_loss": math.nan}).should_stop  # non-finite: train.stop_on_nonfinite's job


# Keras' EarlyStopping baseline (keras/src/callbacks/early_stopping_test.py,
# ``test_early_stopping_baseline``): progress counts only once the baseline is beaten.
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.5, 0.55, 0.58], 2),  # never above 0.6: stopped after patience (2) evaluations
        ([0.5, 0.65, 0.66, 0.7, 0.71], None),  # beaten in time, and progress goes on
        ([0.5, 0.65, 0.65, 0.65], 4),  # beaten, then no progress for patience evaluations
    ],
)
def test_keras_baseline(values: list[float], expected: int | None) -> None:
    tracker = BestTracker("val_accuracy", "max", patience=2, baseline=0.6)
    assert stopped_at(tracker, values) == expected
    if expected == 2:
        assert tracker.stop_reason(0.58).startswith("tracker.baseline: val_accuracy did not "
                                                    "beat 0.6 in 2 evaluations")
        assert tracker.best_value == 0.55  # the best model is still the best seen


def test_keras_start_from_epoch() -> None:
    """Keras' ``test_early_stopping_with_start_from_epoch``: with constant values, patience 3
    and start_from_epoch 2, training lasts at least start_from_epoch + patience epochs."""
    tracker = BestTracker("val_loss", "min", patience=3, start_from_epoch=2)
    assert stopped_at(tracker, [1.0] * 10) == 6  # epochs 1-2 do not count; 3 is progress
    plain = BestTracker("val_loss", "min", patience=3)
    assert stopped_at(plain, [1.0] * 10) == 4
    # Before start_from_epoch an evaluation can still be the best model.
    early = BestTracker("val_loss", "min", patience=3, start_from_epoch=2)
    early.update(1, {"val_loss": 0.1})
    assert early.best_epoch == 1


# Keras' ModelCheckpoint initial_value_threshold (model_checkpoint_test.py): a model is saved
# only once it beats the threshold.
@pytest.mark.parametrize(
    ("mode", "initial", "values", "improved"),
    [
        ("min", 0.01, [0.5, 0.4, 0.3], [False, False, False]),
        ("min", 0.45, [0.5, 0.4, 0.42, 0.3], [False, True, False, True]),
        ("max", 0.8, [0.7, 0.8, 0.85], [False, False, True]),
    ],
)
def test_keras_initial_value_threshold(mode, initial, values, improved) -> None:
    tracker = BestTracker("val_metric", mode, initial_best=initial)
    assert [tracker.update(e, {"val_metric": v}).improved
            for e, v in enumerate(values, 1)] == improved


def test_smoothing_decides_on_the_smoothed_value() -> None:
    # A noisy dip at epoch 3 is the raw best, but not the smoothed best (window 3).
    values = [1.0, 0.8, 0.3, 0.9, 0.5, 0.45, 0.44]
    raw = BestTracker("val_loss", "min")
    smooth = BestTracker("val_loss", "min", smoothing={"window": 3})
    decided = [smooth.update(e, {"val_loss": v}).value for e, v in enumerate(values, 1)]
    for e, v in enumerate(values, 1):
        raw.update(e, {"val_loss": v})
    assert raw.best_epoch == 3
    assert decided[2] == pytest.approx((1.0 + 0.8 + 0.3) / 3)
    assert smooth.best_epoch == 7 and smooth.best_value == pytest.approx((0.5 + 0.45 + 0.44) / 3)
    assert smooth.best_metrics["val_loss"] == 0.44  # the raw record of the chosen evaluation
    ema = BestTracker("val_loss", "min", smoothing={"ema": 0.5})
    got = [ema.update(e, {"val_loss": v}).value for e, v in enumerate([1.0, 0.0, 1.0], 1)]
    assert got == [1.0, 0.5, 0.75]


def test_smoothing_survives_a_resume_and_skips_non_finite_values() -> None:
    values = [1.0, 0.8, math.nan, 0.6, 0.7, 0.5]
    whole = BestTracker("val_loss", "min", smoothing={"window": 2}, patience=5)
    whole_values = [whole.update(e, {"val_loss": v}).value for e, v in enumerate(values, 1)]
    first = BestTracker("val_loss", "min", smoothing={"window": 2}, patience=5)
    for e, v in enumerate(values[:3], 1):
        first.update(e, {"val_loss": v})
    # Through a weights_only torch file, as a checkpoint's train state holds it.
    import io

    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = BestTracker("val_loss", "min", smoothing={"window": 2}, patience=5)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    rest = [second.update(e, {"val_loss": v}).value for e, v in enumerate(values[3:], 4)]
    assert rest == whole_values[3:]
    assert math.isnan(whole_values[2]) and whole_values[3] == pytest.approx(0.7)
    assert second.best_epoch == whole.best_epoch and second.best_value == whole.best_value
