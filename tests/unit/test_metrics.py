"""Metric maths from confusion matrices, checked against scikit-learn on the same labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from workers.evaluation.metrics import (
    ConfusionMatrix,
    ConfusionMetric,
    MeanLoss,
    Metric,
    accuracy_from,
    build_metrics,
    f1_macro_from,
    mcc_from,
    pack_states,
    predicted_labels,
    unpack_compute,
)

TOL = 1e-12


def one_hot_logits(pred: np.ndarray, num_classes: int) -> torch.Tensor:
    """Logits (B, C) whose argmax is ``pred``."""
    logits = torch.randn(len(pred), num_classes, dtype=torch.float64) * 0.1
    logits[torch.arange(len(pred)), torch.as_tensor(pred)] += 10.0
    return logits


def confusion(true: np.ndarray, pred: np.ndarray, num_classes: int, batch: int = 7) -> torch.Tensor:
    """A confusion matrix filled batch by batch, as evaluation does."""
    cm = ConfusionMatrix(num_classes)
    logits = one_hot_logits(pred, num_classes)
    target = torch.as_tensor(true)
    for start in range(0, len(true), batch):
        cm.update(logits[start : start + batch], target[start : start + batch])
    return cm.matrix


def sklearn_values(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": accuracy_score(true, pred),
        "f1_macro": f1_score(true, pred, average="macro"),
        "mcc": matthews_corrcoef(true, pred),
    }


def ours(cm: torch.Tensor) -> dict[str, float]:
    return {"accuracy": accuracy_from(cm), "f1_macro": f1_macro_from(cm), "mcc": mcc_from(cm)}


def assert_matches_sklearn(true: np.ndarray, pred: np.ndarray, num_classes: int) -> None:
    got = ours(confusion(true, pred, num_classes))
    want = sklearn_values(true, pred)
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=TOL, rel=TOL), name


def _random(seed: int, n: int, num_classes: int, skip: int | None = None):
    rng = np.random.default_rng(seed)
    classes = [c for c in range(num_classes) if c != skip]
    true = rng.choice(classes, size=n)
    # Mostly right, sometimes wrong: realistic, and every statistic is non-trivial.
    pred = np.where(rng.random(n) < 0.6, true, rng.choice(classes, size=n))
    return true, pred


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("n", "num_classes"), [(101, 10), (500, 3), (37, 5), (1000, 2), (3, 4)])
def test_random_predictions_match_sklearn(seed: int, n: int, num_classes: int) -> None:
    true, pred = _random(seed, n, num_classes)
    assert_matches_sklearn(true, pred, num_classes)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_classes", [3, 10])
def test_a_class_that_never_appears(seed: int, num_classes: int) -> None:
    # Class 1 is neither a target nor a prediction: sklearn leaves it out of the macro mean.
    true, pred = _random(seed, 200, num_classes, skip=1)
    assert_matches_sklearn(true, pred, num_classes)


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
@pytest.mark.parametrize(
    ("true", "pred", "num_classes"),
    [
        ([0, 0, 0, 0], [0, 0, 0, 0], 2),  # one class everywhere: mcc 0 (undefined)
        ([1, 1, 1], [1, 1, 1], 2),
        ([3, 3, 3], [3, 3, 3], 5),
        ([0, 1, 0, 1, 1], [1, 1, 1, 1, 1], 2),  # all predictions one class
        ([0, 1, 2, 3, 4, 0], [2, 2, 2, 2, 2, 2], 5),
        ([2, 2, 2, 2], [0, 1, 2, 3], 4),  # all targets one class
        ([0, 1, 0, 1], [1, 0, 1, 0], 2),  # always wrong: mcc -1
        ([0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2], 3),  # perfect
        ([0, 1, 2, 0, 1, 2], [1, 2, 0, 1, 2, 0], 3),  # always wrong, several classes
        ([4], [4], 5),  # one sample
        ([4], [0], 5),
        ([0, 0, 1], [2, 2, 2], 3),  # a predicted class that is never a target
    ],
)
def test_degenerate_cases_match_sklearn(true: list, pred: list, num_classes: int) -> None:
    assert_matches_sklearn(np.array(true), np.array(pred), num_classes)


def test_known_values() -> None:
    cm = confusion(np.array([0, 1, 0, 1]), np.array([1, 0, 1, 0]), 2)
    assert mcc_from(cm) == pytest.approx(-1.0)
    cm = confusion(np.array([0, 0, 0]), np.array([0, 0, 0]), 2)
    assert mcc_from(cm) == 0.0 and accuracy_from(cm) == 1.0 and f1_macro_from(cm) == 1.0


def test_empty_matrix() -> None:
    cm = torch.zeros(3, 3, dtype=torch.float64)
    assert np.isnan(accuracy_from(cm))
    assert np.isnan(f1_macro_from(cm))
    assert mcc_from(cm) == 0.0


def test_confusion_matrix_layout_and_reset() -> None:
    cm = ConfusionMatrix(3)
    cm.update(one_hot_logits(np.array([1, 2, 2]), 3), torch.tensor([0, 2, 1]))
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[0, 1] = expected[2, 2] = expected[1, 2] = 1  # rows true, columns predicted
    assert torch.equal(cm.matrix, expected)
    assert cm.matrix.dtype == torch.float64
    cm.reset()
    assert cm.matrix.sum().item() == 0


@pytest.mark.parametrize("shape", ["(B,)", "(B, 1)"])
@pytest.mark.parametrize("seed", range(3))
def test_single_logit_binary_outputs(shape: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(150, generator=gen)
    logits[:5] = 0.0  # exactly 0 is "not > 0": class 0
    target = (torch.rand(150, generator=gen) < 0.4).float()  # BCE-style float targets
    output = logits if shape == "(B,)" else logits.unsqueeze(1)
    if shape == "(B, 1)":
        target = target.unsqueeze(1)

    cm = ConfusionMatrix(2)
    for start in range(0, 150, 32):
        cm.update(output[start : start + 32], target[start : start + 32])
    true = target.reshape(-1).long().numpy()
    pred = (logits > 0).long().numpy()
    got, want = ours(cm.matrix), sklearn_values(true, pred)
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=TOL, rel=TOL), name


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (torch.tensor([-1.0, 0.0, 2.0]), [0, 0, 1]),
        (torch.tensor([[-1.0], [0.5]]), [0, 1]),
        (torch.tensor([[0.1, 0.9, 0.0], [2.0, 1.0, -1.0]]), [1, 0]),
        (torch.tensor([[0.3, 0.7]]), [1]),
    ],
)
def test_predicted_labels(output: torch.Tensor, expected: list[int]) -> None:
    assert predicted_labels(output).tolist() == expected


@pytest.mark.parametrize(
    ("spec", "num_classes", "match"),
    [
        (["accuracy"], None, "integer class targets"),
        (["auc"], 3, "unknown metric 'auc'"),
        ([42], 3, "neither a built-in name"),
        ([object()], 3, "neither a built-in name"),
        (["accuracy", "accuracy"], 3, "unique"),
        (["loss"], 3, "unknown metric 'loss'"),
    ],
)
def test_build_metrics_errors(spec: list, num_classes: int | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_metrics(spec, num_classes)


def test_build_metrics_rejects_a_user_metric_called_loss() -> None:
    metric = MeanAbsoluteError()
    metric.name = "loss"
    with pytest.raises(ValueError, match="not 'loss'"):
        build_metrics([metric], None)


def test_build_metrics_rejects_a_duplicate_user_metric_name() -> None:
    metric = MeanAbsoluteError()
    metric.name = "mcc"
    with pytest.raises(ValueError, match="unique"):
        build_metrics(["mcc", metric], 2)


@pytest.mark.parametrize(
    ("spec", "num_classes", "names"),
    [
        (None, 3, []),
        ([], None, []),
        (["accuracy", "f1_macro", "mcc"], 10, ["accuracy", "f1_macro", "mcc"]),
        (["mcc"], 2, ["mcc"]),
    ],
)
def test_build_metrics(spec: list | None, num_classes: int | None, names: list[str]) -> None:
    metrics = build_metrics(spec, num_classes)
    assert [m.name for m in metrics] == names
    assert all(isinstance(m, ConfusionMetric) for m in metrics)


class MeanAbsoluteError:
    """A user metric written from the module docstring alone: sums and counts, no imports."""

    name = "mae"

    def __init__(self) -> None:
        self.reset()

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self._abs += (output.reshape(-1) - target.reshape(-1)).abs().sum().item()
        self._n += target.numel()

    def state(self) -> torch.Tensor:
        return torch.tensor([self._abs, self._n], dtype=torch.float64)

    def compute(self, state: torch.Tensor) -> float:
        total, n = state.tolist()
        return total / n

    def reset(self) -> None:
        self._abs, self._n = 0.0, 0


def test_user_metric_follows_the_protocol() -> None:
    metric = MeanAbsoluteError()
    assert isinstance(metric, Metric)
    assert build_metrics([metric], None) == [metric]


def _evaluate_parts(parts, num_classes: int, user: bool):
    """Each part is one rank's (outputs, targets, batch losses); returns summed packed states."""
    summed, sizes, loss, metrics = None, None, None, None
    for outputs, targets in parts:
        loss = MeanLoss()
        metrics = build_metrics(["accuracy", "f1_macro", "mcc"], num_classes)
        if user:
            metrics = [*metrics, MeanAbsoluteError()]
        for out, y in zip(outputs, targets, strict=True):
            loss.add_batch(torch.nn.functional.cross_entropy(out, y).item(), len(y))
            for m in metrics:
                # The user metric here scores predicted labels as numbers (|pred - true|).
                m.update(out.argmax(-1).double() if m.name == "mae" else out, y)
        vector, sizes = pack_states(loss, metrics)
        assert vector.dtype == torch.float64 and vector.ndim == 1
        assert sum(sizes) == vector.numel()
        summed = vector if summed is None else summed + vector
    return summed, sizes, loss, metrics


@pytest.mark.parametrize("user", [False, True], ids=["builtin", "with_user_metric"])
def test_pack_unpack_round_trip_equals_one_pass(user: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(101, 4, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 4, (101,), generator=gen)
    batches = lambda lo, hi, b: (  # noqa: E731
        [outputs[i : min(i + b, hi)] for i in range(lo, hi, b)],
        [targets[i : min(i + b, hi)] for i in range(lo, hi, b)],
    )
    # "Two ranks" with different sizes and batchings, summed as an all-reduce would.
    summed, sizes, loss, metrics = _evaluate_parts([batches(0, 60, 16), batches(60, 101, 9)], 4,
                                                   user)
    values = unpack_compute("val", summed, sizes, loss, metrics)

    expected_names = ["val_loss", "val_accuracy", "val_f1_macro", "val_mcc"]
    assert list(values) == expected_names + (["val_mae"] if user else [])
    pred = outputs.argmax(-1).numpy()
    true = targets.numpy()
    full_loss = torch.nn.functional.cross_entropy(outputs, targets).item()
    assert values["val_loss"] == pytest.approx(full_loss, rel=1e-12)
    for name, want in sklearn_values(true, pred).items():
        assert values[f"val_{name}"] == pytest.approx(want, abs=TOL, rel=TOL)
    if user:
        assert values["val_mae"] == pytest.approx(np.abs(pred - true).mean(), rel=1e-12)
    assert all(isinstance(v, float) for v in values.values())


def test_pack_sizes_and_order() -> None:
    loss = MeanLoss()
    loss.add_batch(0.5, 4)
    loss.add_batch(1.0, 2)
    metrics = build_metrics(["accuracy", "mcc"], 3)
    vector, sizes = pack_states(loss, metrics)
    assert sizes == [2, 9, 9]
    assert vector[:2].tolist() == [4.0, 6.0]
    values = unpack_compute("train", vector, sizes, loss, metrics)
    assert values["train_loss"] == pytest.approx(4.0 / 6.0)
    assert np.isnan(values["train_accuracy"])  # no samples seen by the metrics


def test_mean_loss_of_nothing_is_nan() -> None:
    loss = MeanLoss()
    vector, sizes = pack_states(loss, [])
    assert sizes == [2]
    assert np.isnan(unpack_compute("val", vector, sizes, loss, [])["val_loss"])
