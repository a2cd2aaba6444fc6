"""tracker.mode auto: the direction a metric object declares, else the table of name words,
else a one-line refusal (contract/direction.py); and what the metrics declare."""

from __future__ import annotations

import pytest

from workers.contract.direction import by_name, name_words, resolve
from workers.contract.user_errors import UserInputError


@pytest.mark.parametrize(
    ("monitor", "mode"),
    [
        # The names the name-contains-'loss'-or-'error' rule maximised: each kept its worst.
        ("val_mse", "min"), ("val_rmse", "min"), ("val_mae", "min"), ("val_perplexity", "min"),
        ("val_ppl", "min"), ("val_hinge", "min"), ("val_wer", "min"), ("val_cer", "min"),
        ("val_kl_divergence", "min"), ("val_edit_distance", "min"),
        ("val_mean_squared_error", "min"), ("val_MeanAbsoluteError", "min"),
        ("val_loss", "min"), ("train_loss", "min"), ("val_error_rate", "min"),
        ("val_top1_error", "min"), ("val_nll", "min"),
        ("val_accuracy", "max"), ("val_acc", "max"), ("val_f1_macro", "max"),
        ("val_multiclass_auroc", "max"), ("val_mcc", "max"), ("val_r2", "max"),
        ("val_r2_score", "max"), ("val_iou", "max"), ("val_dice", "max"), ("val_bleu", "max"),
        ("val_binary_f1_score", "max"), ("val_precision", "max"), ("val_recall", "max"),
    ],
)
def test_the_table_places_common_names(monitor: str, mode: str) -> None:
    direction = resolve(monitor, "auto")
    assert direction.mode == mode
    assert direction.source.startswith("by name")


@pytest.mark.parametrize("monitor", [
    "val_custom", "val_throughput", "val_lossless_ratio", "val_accumulated", "val_f1_error",
    "val_score_x",
])
def test_a_name_the_table_cannot_place_is_refused_in_one_line(monitor: str) -> None:
    # Whole words only: 'lossless' is not 'loss', 'accumulated' is not 'acc'; words of both
    # kinds ('f1' and 'error') place nothing. 'score' alone is a maximised word.
    if monitor == "val_score_x":
        assert resolve(monitor, "auto").mode == "max"
        return
    with pytest.raises(UserInputError) as err:
        resolve(monitor, "auto")
    message = str(err.value)
    assert "\n" not in message and message.startswith("tracker.mode:")
    assert monitor in message and "tracker.mode: min" in message and "tracker.mode: max" in message


def test_a_declared_direction_wins_over_the_name() -> None:
    # An object that says higher is better is believed even where the name says otherwise.
    declared = {"val_mse": (True, "MyMSE"), "val_custom": (False, "Perplexity")}
    assert resolve("val_mse", "auto", declared).mode == "max"
    custom = resolve("val_custom", "auto", declared)
    assert custom.mode == "min"
    assert custom.source == "declared by Perplexity: higher_is_better=False"


@pytest.mark.parametrize("mode", ["min", "max"])
def test_a_set_mode_is_kept_whatever_the_name_or_declaration(mode: str) -> None:
    direction = resolve("val_accuracy", mode, {"val_accuracy": (True, "Accuracy")})
    assert direction.mode == mode and direction.source == "set by tracker.mode"


def test_name_words_split_case_and_separators() -> None:
    assert name_words("val_MeanSquaredError") == ["val", "mean", "squared", "error"]
    assert name_words("val-top1.acc") == ["val", "top1", "acc"]
    assert by_name("val_error_score") is not None and by_name("val_error_score").mode == "min"


def test_torchmetrics_declare_their_direction_in_a_workloads_metrics() -> None:
    from torchmetrics import MeanSquaredError, MetricCollection
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
    from torchmetrics.regression import KLDivergence, MinkowskiDistance
    from torchmetrics.text import EditDistance, Perplexity

    from workers.evaluation.metrics import spec_directions

    declared = spec_directions([MeanSquaredError(), Perplexity(), EditDistance(),
                                MinkowskiDistance(p=2), KLDivergence(), "accuracy"])
    assert declared == {
        "mean_squared_error": (False, "MeanSquaredError"), "perplexity": (False, "Perplexity"),
        "edit_distance": (False, "EditDistance"),
        "minkowski_distance": (False, "MinkowskiDistance"),
        "kl_divergence": (False, "KLDivergence"), "accuracy": (True, "the built-in accuracy")}
    # A mapping's own names; a collection's members under the names it gives them.
    collection = MetricCollection({"acc": MulticlassAccuracy(3), "f1": MulticlassF1Score(3)},
                                  prefix="cls_", compute_groups=True)
    assert spec_directions({"lm": Perplexity(), "group": collection}) == {
        "lm": (False, "Perplexity"), "group_cls_acc": (True, "MulticlassAccuracy"),
        "group_cls_f1": (True, "MulticlassF1Score")}
    assert spec_directions(collection) == {"cls_acc": (True, "MulticlassAccuracy"),
                                           "cls_f1": (True, "MulticlassF1Score")}
    # A workload's own metric object may declare it with the same attribute.

    class Regret:
        name, higher_is_better = "custom_regret_value", False

        def update(self, output, target): ...
        def state(self): ...
        def compute(self, state): ...
        def reset(self): ...

    assert spec_directions([Regret()]) == {"custom_regret_value": (False, "Regret")}
    direction = resolve("val_mean_squared_error", "auto",
                        {f"val_{k}": v for k, v in declared.items()})
    assert direction.mode == "min" and "MeanSquaredError" in direction.source


def test_a_metric_collection_is_one_metric_object_reporting_each_member() -> None:
    import torch
    from torchmetrics import MetricCollection
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassPrecision,
        MulticlassRecall,
    )

    from workers.evaluation.metrics import (
        MeanLoss,
        build_metrics,
        pack_states,
        reported_names,
        unpack_compute,
    )

    def collection():
        return MetricCollection([MulticlassAccuracy(3), MulticlassPrecision(3),
                                 MulticlassRecall(3)], postfix="_m", compute_groups=True)

    metrics = build_metrics(collection(), 3)
    assert [reported_names(m) for m in metrics] == [
        ["MulticlassAccuracy_m", "MulticlassPrecision_m", "MulticlassRecall_m"]]
    gen = torch.Generator().manual_seed(0)
    logits, target = torch.randn(37, 3, generator=gen), torch.randint(0, 3, (37,), generator=gen)
    for start in range(0, 37, 8):
        metrics[0].update(logits[start:start + 8], target[start:start + 8])
    loss = MeanLoss()
    loss.add_batch(1.0, 37)
    vector, sizes = pack_states(loss, metrics)
    values = unpack_compute("val", vector, sizes, loss, metrics)
    whole = collection()
    whole.update(logits, target)
    assert values == {"val_loss": 1.0, **{f"val_{k}": float(v)
                                         for k, v in whole.compute().items()}}
    # Each member is named once; two collections naming a member alike are refused.
    with pytest.raises(ValueError, match="unique"):
        build_metrics({"a": collection(), "b": MulticlassAccuracy(3),
                       "a_MulticlassAccuracy_m": MulticlassAccuracy(3)}, 3)


def test_an_unknown_builtin_name_names_its_key() -> None:
    from workers.evaluation.metrics import build_metrics

    with pytest.raises(ValueError, match=r"^metrics: unknown metric 'auc'; built-ins"):
        build_metrics(["auc"], 2)
