"""bf16 mixed precision: autocast really applies, while weights, losses and metrics stay float32."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from workers.evaluation.metrics import build_metrics
from workers.loop.precision import as_float32
from workers.loop.scoring import accumulate, evaluate_dataset
from workers.loop.training import train_epoch

CPU = torch.device("cpu")


class Probe(torch.nn.Module):
    """An MLP that records the dtype of its hidden activations."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(8, 32)
        self.out = torch.nn.Linear(32, 3)
        self.seen: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        self.seen.add(h.dtype)
        return self.out(torch.relu(h))


def data(n: int = 96) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return TensorDataset(x, y)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_training_step_runs_under_autocast_and_keeps_float32_weights(precision, dtype) -> None:
    torch.manual_seed(0)
    model = Probe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(data(), batch_size=16)
    loss = train_epoch(model, loader, torch.nn.functional.cross_entropy, optimizer, CPU,
                       precision)
    assert model.seen == {dtype}
    state = model.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())
    assert any(not torch.equal(before[k], state[k]) for k in state)  # it did train
    assert torch.isfinite(torch.tensor(loss.compute(loss.state())))


def test_bf16_evaluation_is_close_to_fp32_but_not_the_same() -> None:
    torch.manual_seed(0)
    model = Probe()
    dataset = data()
    results = {}
    for precision in ("fp32", "bf16"):
        metrics = build_metrics(["accuracy", "f1_macro"], num_classes=3)
        results[precision] = evaluate_dataset(
            model, dataset, torch.nn.functional.cross_entropy, metrics, split="val",
            batch_size=32, device=CPU, precision=precision)
    fp32, bf16 = results["fp32"], results["bf16"]
    assert all(isinstance(v, float) for v in bf16.values())
    assert bf16["val_loss"] == pytest.approx(fp32["val_loss"], rel=2e-2)
    assert bf16["val_loss"] != fp32["val_loss"]  # the bf16 pass really ran in bfloat16
    assert model.seen == {torch.float32, torch.bfloat16}


def test_metrics_see_float32_outputs() -> None:
    class Spy:
        name = "spy"

        def __init__(self) -> None:
            self.dtypes: set[torch.dtype] = set()

        def update(self, output, target) -> None:
            self.dtypes.add(output.dtype)

        def state(self) -> torch.Tensor:
            return torch.zeros(1, dtype=torch.float64)

        def compute(self, state) -> float:
            return 0.0

        def reset(self) -> None:
            pass

    spy = Spy()
    accumulate(Probe(), DataLoader(data(), batch_size=32), torch.nn.functional.cross_entropy,
               [spy], CPU, "bf16")
    assert spy.dtypes == {torch.float32}


def test_as_float32_leaves_integers_and_float64_alone() -> None:
    out = as_float32({"a": torch.ones(2, dtype=torch.bfloat16),
                      "b": (torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.float64))})
    assert out["a"].dtype == torch.float32
    assert out["b"][0].dtype == torch.int64 and out["b"][1].dtype == torch.float64


def test_fastai_learner_trains_and_validates_under_bf16_on_cpu() -> None:
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy

    from workers.loop.learner_splits import Bf16Autocast

    torch.manual_seed(0)
    model = Probe()
    dls = DataLoaders.from_dsets(data(), data(48), bs=16, device=CPU)
    preds: set[torch.dtype] = set()

    def seen_accuracy(pred, target):
        preds.add(pred.dtype)
        return accuracy(pred, target)

    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=[seen_accuracy])
    with learn.no_bar(), learn.no_logging():
        learn.fit(2, 1e-2, cbs=[Bf16Autocast(CPU)])
    assert model.seen == {torch.bfloat16}  # training and validation batches alike
    assert preds == {torch.float32}
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    train_loss, valid_loss, acc = learn.recorder.values[-1]
    assert all(isinstance(v, float) and v == v for v in (train_loss, valid_loss, acc))
    # Without the callback fastai's Learner on CPU stays in float32.
    model.seen.clear()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    assert model.seen == {torch.float32}
