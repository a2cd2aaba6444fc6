"""Batches and outputs as users write them (no Ray): how a batch is split, what the model is
called with, which tensor the metrics see, which loss is trained, and the one-line errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Subset, TensorDataset, default_collate

from workers.contract.user_errors import UserInputError
from workers.evaluation.metrics import build_metrics, snake_case
from workers.loop.batches import Batches, check_first_batch, logits_of
from workers.loop.devices import to_device
from workers.loop.loaders import loader_workers, make_loader
from workers.loop.metric_setup import check_metrics, workload_metrics

CPU = torch.device("cpu")
X = torch.randn(3, 4)
Y = torch.tensor([0, 1, 1])


def test_a_pair_is_input_and_target():
    inputs, target = Batches(torch.nn.functional.cross_entropy).split((X, Y))
    assert inputs is X and target is Y


def test_a_mapping_goes_in_without_its_target_when_there_is_a_loss_fn():
    batch = {"x": X, "mask": X > 0, "label": Y}
    inputs, target = Batches(torch.nn.functional.cross_entropy, "label").split(batch)
    assert set(inputs) == {"x", "mask"} and target is Y


def test_a_mapping_goes_in_whole_when_the_model_computes_its_own_loss():
    inputs, target = Batches(None).split({"input_ids": X, "labels": Y})
    assert set(inputs) == {"input_ids", "labels"} and target is Y


def test_a_mapping_without_the_label_key_names_its_keys():
    with pytest.raises(UserInputError, match=r"^workload\.label_key: a batch is a mapping without "
                       r"the label key 'labels' \(its keys: x, y\)"):
        Batches(None).split({"x": X, "y": Y})
    with pytest.raises(UserInputError, match=r"^workload\.label_key: val_dataset's first batch "):
        Batches(None).split({"x": X, "y": Y}, "val")


def test_a_batch_that_is_no_pair_names_the_collate_fn_that_made_it_or_the_split():
    made = Batches(None, collate_fn_given=True)
    with pytest.raises(UserInputError, match=r"^workload\.collate_fn: it made train_dataset's "
                       r"first batch list\(tensor\(3, 4\)\), neither an \(input, target\) pair"):
        made.split([X], "train")
    with pytest.raises(UserInputError, match=r"^workload\.test_dataset: a batch \(tensor\(3, 4\)\) "
                       "is neither"):
        Batches(None).split(X, "test")
    assert Batches.of(SimpleNamespace(collate_fn=len)).collate_fn_given
    assert not Batches.of(SimpleNamespace(collate_fn=None)).collate_fn_given


@pytest.mark.parametrize("output", [
    X, (X, "hidden"), [X], {"logits": X, "loss": torch.tensor(1.0)},
    SimpleNamespace(logits=X, loss=None),
])
def test_the_logits_of_every_common_output(output):
    assert logits_of(output) is X


def test_an_output_without_logits_is_one_line():
    with pytest.raises(UserInputError, match=r"\{scores: tensor\(3, 4\)\}\) is neither a tensor"):
        logits_of({"scores": X})


def test_the_models_own_loss_is_trained_and_a_missing_one_is_named():
    out = SimpleNamespace(logits=X, loss=torch.tensor(0.5))
    assert Batches(None).loss(out, Y).item() == 0.5
    with pytest.raises(UserInputError, match="has no 'loss'"):
        Batches(None).loss(X, Y)


def test_a_loss_fn_gets_the_logits_of_an_output_object():
    seen = []
    loss = Batches(lambda logits, y: seen.append(logits) or logits.sum())
    loss.loss(SimpleNamespace(logits=X), Y)
    assert seen[0] is X


class TakesX(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_a_batch_the_model_cannot_take_names_its_keys_and_the_forward_parameters():
    batches = Batches(torch.nn.functional.cross_entropy)
    with pytest.raises(UserInputError) as err:
        check_first_batch(TakesX(), batches, {"features": X, "labels": Y}, CPU, to_device)
    message = str(err.value)
    assert "cannot take a batch of {features: tensor(3, 4)}" in message
    assert "its forward takes (x)" in message and "\n" not in message


def test_a_loss_fn_that_fails_on_the_output_is_one_line():
    batches = Batches(lambda logits, y: logits @ torch.ones(3))  # wrong shapes
    with pytest.raises(UserInputError, match="workload.loss_fn: it fails on the model's logits"):
        check_first_batch(TakesX(), batches, (X, Y), CPU, to_device)


def test_a_good_first_batch_passes_and_leaves_the_model_in_training_mode():
    model = TakesX()
    check_first_batch(model, Batches(torch.nn.functional.cross_entropy), (X, Y), CPU, to_device)
    assert model.training


def test_loader_workers_auto_starts_none_for_in_memory_tensors():
    tensors = TensorDataset(X, Y)
    assert loader_workers("auto", tensors, 4) == 0
    assert loader_workers("auto", Subset(tensors, [0, 1]), 4) == 0
    assert loader_workers("auto", ["a PIL image"], 1) == 2
    assert loader_workers("auto", ["a PIL image"], 16) == 8
    assert loader_workers(3, tensors, 1) == 3


def test_torchmetrics_are_named_after_their_class_or_their_key():
    from torchmetrics.classification import MulticlassAUROC
    from torchmetrics.regression import MeanSquaredError

    assert snake_case("MulticlassAUROC") == "multiclass_auroc"
    assert [m.name for m in build_metrics([MulticlassAUROC(num_classes=2), "accuracy"], 2)] == [
        "multiclass_auroc", "accuracy"]
    assert [m.name for m in build_metrics({"auroc": MulticlassAUROC(num_classes=2),
                                           "mse": MeanSquaredError()}, 2)] == ["auroc", "mse"]


def test_a_torchmetric_it_would_average_across_ranks_is_refused_by_name():
    from tests.workloads.mistakes import averaged_metric

    work = SimpleNamespace(metrics={"acc": averaged_metric()})
    with pytest.raises(UserInputError, match=r"workload.metrics: acc \(MeanOfBatchMeans\) cannot"):
        workload_metrics(work, 2)


def test_a_torchmetric_in_one_process_equals_its_own_compute():
    from torchmetrics.classification import MulticlassAUROC

    # Probabilities, not logits: torchmetrics applies softmax to a batch only when some value
    # lies outside [0, 1], so a last batch of 2 rows whose logits all fall inside would be
    # scored as probabilities (about 1 draw in 100) and differ from the one-call compute.
    [ours] = build_metrics([MulticlassAUROC(num_classes=2)], 2)
    generator = torch.Generator().manual_seed(0)
    probs = torch.randn(50, 2, generator=generator).softmax(1)
    y = torch.randint(0, 2, (50,), generator=generator)
    for part in range(0, 50, 16):
        ours.update(probs[part:part + 16], y[part:part + 16])
    assert ours.compute(ours.state()) == pytest.approx(
        MulticlassAUROC(num_classes=2)(probs, y).item(), rel=1e-7)


def test_a_workloads_loader_options_set_the_loaders_but_not_the_runs_own_settings():
    data = TensorDataset(X, Y)
    loader = make_loader(data, 2, default_collate, workers=0, device=CPU,
                         options={"num_workers": 1, "prefetch_factor": 3, "timeout": 30})
    assert (loader.num_workers, loader.prefetch_factor, loader.timeout) == (1, 3, 30)
    assert loader.persistent_workers  # kept between epochs, as the run's own default
    assert make_loader(data, 2, default_collate, workers=0, device=CPU).num_workers == 0
    with pytest.raises(UserInputError, match="workload.loader_options: batch_size, shuffle"):
        make_loader(data, 2, default_collate, workers=0, device=CPU,
                    options={"shuffle": True, "batch_size": 4})
    with pytest.raises(UserInputError, match="workload.loader_options: .*bogus"):
        make_loader(data, 2, default_collate, workers=0, device=CPU, options={"bogus": 1})


def test_the_metrics_are_tried_on_the_first_batch_naming_the_one_that_fails():
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy

    logits, target = torch.randn(4, 10), torch.tensor([0, 9, 3, 7])
    for spec, name in [([MulticlassAccuracy(num_classes=3)], "multiclass_accuracy"),
                       (MetricCollection({"top": MulticlassAccuracy(num_classes=10),
                                          "acc3": MulticlassAccuracy(num_classes=3)}), "acc3")]:
        metrics = build_metrics(spec, 10)
        with pytest.raises(UserInputError) as err:
            check_metrics(metrics, logits, target)
        message = str(err.value)
        assert message.startswith(f"workload.metrics: {name} (MulticlassAccuracy) fails on the "
                                  "first batch's logits (tensor(4, 10)) and target (tensor(4,))")
        assert "\n" not in message


def test_trying_the_metrics_leaves_them_as_they_were():
    from torchmetrics.classification import MulticlassAccuracy
    from torchmetrics.regression import R2Score

    logits, target = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    metrics = build_metrics([MulticlassAccuracy(num_classes=3), "accuracy"], 3)
    check_metrics(metrics, logits, target)
    assert not metrics[0].metric.update_called
    assert metrics[1].state().sum() == 0
    # A value one batch is too small for (R2Score needs two samples) is no mistake.
    [r2] = build_metrics([R2Score()], None)
    check_metrics([r2], torch.randn(1), torch.randn(1))


class Uncopyable:
    """A metric of the project's protocol that ``copy.deepcopy`` cannot copy."""

    name = "seen"

    def __init__(self) -> None:
        self.lock = __import__("threading").Lock()
        self.reset()

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.count += len(target)

    def state(self) -> torch.Tensor:
        return torch.tensor([self.count], dtype=torch.float64)

    def compute(self, state: torch.Tensor) -> float:
        return float(state[0])

    def reset(self) -> None:
        self.count = 0


def test_a_metric_that_cannot_be_copied_is_tried_then_reset():
    metric = Uncopyable()
    check_metrics([metric], X, Y)
    assert metric.count == 0
