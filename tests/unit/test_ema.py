"""``train.ema_decay``: the EMA's update (torch's own, checked against ``AveragedModel``), its
evaluation inside the model, its whole state read back and restored; the choice between the
raw and the EMA weights; a save of the EMA (model file, metadata, resume state); divergence
judged on what training and the decision use (a NaN of the losing EMA alone goes on); the
epoch line with the chosen values and which weights won; the schema.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray.train
import torch
from pydantic import ValidationError
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from orchestrator.results.epochs import epoch_record, nonfinite, progress_line
from tests.unit.test_checkpoint_manager import WritingSaver
from workers.checkpoint import manager as manager_module
from workers.checkpoint.load import load_metadata, load_train_state, load_weights
from workers.checkpoint.manager import CheckpointManager
from workers.contract.config import RunConfig
from workers.decisions.tracker import tracker_of
from workers.decisions.weights import alternates, better_weights, chosen, ema_wins, with_both
from workers.loop.ema import EmaState, WeightsEma
from workers.loop.runtime import trained_weights
from workers.loop.sharding import LocalState

NAN, INF = float("nan"), float("inf")


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    model.train()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


# -- the choice (pure) ---------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "ema", "mode", "wins"), [
    (1.0, 0.5, "min", True), (0.5, 1.0, "min", False), (1.0, 1.0, "min", False),  # tie: raw
    (0.5, 0.9, "max", True), (0.9, 0.5, "max", False),
    (NAN, 1.0, "min", True), (1.0, NAN, "min", False), (NAN, NAN, "min", False),
    (INF, 1.0, "min", True), (1.0, -INF, "min", False), (NAN, 0.3, "max", True),
])
def test_ema_wins_strictly_and_nonfinite_loses(raw: float, ema: float, mode: Any,
                                               wins: bool) -> None:
    assert ema_wins(raw, ema, mode) is wins


def test_better_weights_on_the_monitor_only() -> None:
    raw = {"train_loss": 0.2, "val_loss": 0.5, "val_accuracy": 0.8}
    ema = {"val_loss": 0.4, "val_accuracy": 0.7}
    assert better_weights("val_loss", "min", raw, ema) == "ema"
    assert better_weights("val_accuracy", "max", raw, ema) == "raw"
    assert better_weights("train_loss", "min", raw, ema) == "raw"  # trained on raw only


def test_with_both_keeps_the_winner_under_the_usual_names() -> None:
    raw = {"train_loss": 0.2, "val_loss": 0.5, "val_accuracy": 0.8, "lr": 0.1}
    ema = {"val_loss": 0.4, "val_accuracy": 0.7}
    values = with_both(raw, ema, "ema")
    assert values == {"train_loss": 0.2, "val_loss": 0.4, "val_accuracy": 0.7, "lr": 0.1,
                      "val_loss_raw": 0.5, "val_loss_ema": 0.4,
                      "val_accuracy_raw": 0.8, "val_accuracy_ema": 0.7}
    assert with_both(raw, ema, "raw")["val_loss"] == 0.5


# -- the average -----------------------------------------------------------------------------------
def test_update_is_torchs_ema_buffers_included() -> None:
    model = bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = WeightsEma(model, 0.9)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    reference.update_parameters(model)  # its first update copies: both start at W_0
    for step in range(6):
        train_step(model, optimizer, step)
        ema.update()
        reference.update_parameters(model)
    ours = ema.weights()
    theirs = reference.module.state_dict()
    assert ours.keys() == model.state_dict().keys()
    for name, value in ours.items():
        if torch.is_floating_point(value):
            torch.testing.assert_close(value, theirs[name], rtol=0, atol=1e-6)
        else:  # num_batches_tracked: the model's own
            assert torch.equal(value, model.state_dict()[name])
    assert ema.updates == 6
    # By hand, the first layer's weight: ema = 0.9 ema + 0.1 w after each step.
    assert not torch.allclose(ours["0.weight"], model.state_dict()["0.weight"])


def test_swapped_evaluates_the_ema_and_gives_the_raw_weights_back() -> None:
    model = bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = WeightsEma(model, 0.5)
    for step in range(3):
        train_step(model, optimizer, step)
        ema.update()
    raw = copy.deepcopy(model.state_dict())
    averaged = {k: v.clone() for k, v in ema.weights().items()}
    with ema.swapped():
        for name, value in model.state_dict().items():
            assert torch.equal(value, averaged[name])
        model[1].running_mean.fill_(7.0)  # as rank 0's broadcast would replace it
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw[name]), name
    assert torch.equal(ema.weights()["1.running_mean"], torch.full((8,), 7.0))


def test_tied_weights_share_one_average() -> None:
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight
    ema = WeightsEma(model, 0.9)
    assert len(ema.shadow) == 1
    weights = ema.weights()
    assert weights["0.weight"].data_ptr() == weights["1.weight"].data_ptr()


def test_state_dict_round_trip() -> None:
    model = bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = WeightsEma(model, 0.8)
    for step in range(4):
        train_step(model, optimizer, step)
        ema.update()
    saved = {"weights": {k: v.clone() for k, v in ema.state_dict()["weights"].items()},
             "updates": ema.updates}
    fresh = WeightsEma(bn_model(), 0.8)
    fresh.load_state_dict(saved)
    assert fresh.updates == 4
    for name, value in fresh.weights().items():
        if torch.is_floating_point(value):
            assert torch.equal(value, saved["weights"][name])


# -- a save of the EMA's weights -----------------------------------------------------------------
def test_manager_saves_the_winner_and_the_raw_weights_to_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RunConfig.model_validate({
        "name": "ema", "storage_path": str(tmp_path),
        "workload": {"entrypoint": "tests.workloads.overfit:build"},
        "train": {"epochs": 3, "ema_decay": 0.5}, "tracker": {"monitor": "val_loss"},
        "checkpoint": {"policy": "all", "resume_every_n_epochs": 1}})
    model = bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = WeightsEma(model, 0.5)
    raw_state = LocalState(model, optimizer)
    saver = WritingSaver(tmp_path)
    manager = CheckpointManager(cfg, True, tracker_of(cfg), saver, raw_state,
                                torch.device("cpu"), 1, extras={"ema": ema},
                                ema_state=EmaState(ema, raw_state))
    monkeypatch.setattr(ray.train, "report", lambda metrics, **_: None)
    kinds = ["raw", "ema"]
    for epoch, weights in enumerate(kinds, start=1):
        train_step(model, optimizer, epoch)
        ema.update()
        manager.report(epoch, {"train_loss": 1.0, "val_loss": 1.0 / epoch}, 0.0,
                       weights=weights)
    for (metrics, path), weights in zip(saver.saves, kinds, strict=True):
        assert metrics["weights"] == weights
        assert load_metadata(path)["weights"] == weights
    raw_path, ema_path = (path for _, path in saver.saves)
    expected_ema = ema.weights()
    for name, value in load_weights(ema_path).items():
        torch.testing.assert_close(value, expected_ema[name])
    state = load_train_state(ema_path)
    assert "raw_weights" not in load_train_state(raw_path)
    resumed = trained_weights(load_weights(ema_path), state)
    for name, value in model.state_dict().items():  # training continues from the raw ones
        torch.testing.assert_close(resumed[name], value)
    for name, value in state["extras"]["ema"]["weights"].items():
        torch.testing.assert_close(value, expected_ema[name])
    assert state["extras"]["ema"]["updates"] == 2


# -- divergence: the chosen weights' values, not the alternates ---------------------------------
FINE = {"train_loss": 0.3, "val_loss": 0.5, "val_accuracy": 0.8, "lr": 0.1}


def scored(raw: dict[str, float], ema: dict[str, float]) -> tuple[dict[str, float], Any]:
    """An evaluation's values and winner, as ``torch_engine.evaluate_both`` builds them."""
    winner = better_weights("val_loss", "min", raw, ema)
    return with_both(raw, ema, winner), winner


@pytest.mark.parametrize(("raw", "ema", "winner", "stops"), [
    # The EMA still warming up: NaN scores, it loses, the raw weights train on.
    (FINE, {"val_loss": NAN, "val_accuracy": NAN}, "raw", False),
    (FINE, {"val_loss": 0.4, "val_accuracy": INF}, "ema", True),  # the chosen model's metric
    ({**FINE, "val_loss": NAN, "val_accuracy": NAN}, {"val_loss": 0.4, "val_accuracy": 0.7},
     "ema", False),  # the raw weights' scoring alone: the EMA is the model
    ({**FINE, "val_loss": NAN}, {"val_loss": NAN, "val_accuracy": 0.7}, "raw", True),
    ({**FINE, "train_loss": NAN}, {"val_loss": 0.4, "val_accuracy": 0.7}, "ema", True),
])
def test_only_what_training_and_the_decision_use_can_diverge(
        raw: dict[str, float], ema: dict[str, float], winner: str, stops: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RunConfig.model_validate({
        "workload": {"entrypoint": "tests.workloads.overfit:build"},
        "train": {"epochs": 5, "ema_decay": 0.9}, "tracker": {"monitor": "val_loss"},
        "checkpoint": {"policy": "none"}})
    manager = CheckpointManager(cfg, True, tracker_of(cfg), None, None,  # type: ignore[arg-type]
                                torch.device("cpu"), 1)
    reports: list[dict[str, Any]] = []  # what the manager hands Ray Train, without a model
    monkeypatch.setattr(manager_module, "train_fn_utils",
                        lambda: SimpleNamespace(report=reports.append))
    values, won = scored(raw, ema)
    assert won == winner
    assert manager.report(1, values, 0.0, weights=won) is stops
    record = epoch_record(reports[0], None)
    assert bool(nonfinite(record)) is stops  # the driver's line and summary.json say the same
    assert set(values) - set(chosen(values)) == alternates(values) == {
        "val_loss_raw", "val_loss_ema", "val_accuracy_raw", "val_accuracy_ema"}
    # Without an EMA every value counts, as before.
    plain = {**FINE, "val_accuracy": NAN}
    assert manager.report(2, plain, 0.0) is True and nonfinite(plain) == ["val_accuracy"]


# -- the epoch line ------------------------------------------------------------------------------
def test_the_epoch_line_shows_the_chosen_values_and_which_weights_won() -> None:
    values, winner = scored(FINE, {"val_loss": 0.4, "val_accuracy": 0.7})
    record = epoch_record({"epoch": 3, **values, "weights": winner, "is_best": True},
                          "/runs/r/checkpoint_epoch0003_1")
    assert progress_line(record, 10, "val_loss") == (
        "epoch 3/10  train_loss=0.3000  val_loss=0.4000  val_accuracy=0.7000  [ema]"
        "  * new best val_loss  (saved)")
    assert record["val_loss_raw"] == 0.5  # the history and W&B keep both scorings
    values, winner = scored(FINE, {"val_loss": NAN, "val_accuracy": NAN})
    line = progress_line(epoch_record({"epoch": 1, **values, "weights": winner}, None), 10,
                         "val_loss")
    assert line == "epoch 1/10  train_loss=0.3000  val_loss=0.5000  val_accuracy=0.8000  [raw]"
    # Without an EMA: every metric, no marker.
    assert progress_line(epoch_record({"epoch": 1, **FINE}, None), 2, "val_loss") == (
        "epoch 1/2  train_loss=0.3000  val_loss=0.5000  val_accuracy=0.8000")


# -- the schema ----------------------------------------------------------------------------------
def test_schema() -> None:
    base = {"workload": {"entrypoint": "m:f"}}
    assert RunConfig.model_validate(base).train.ema_decay is None
    assert RunConfig.model_validate({**base, "train": {"ema_decay": 0.99}}).train.ema_decay == 0.99
    for bad in (0, 1, 1.5, -0.1, math.nan):
        with pytest.raises(ValidationError, match="ema_decay"):
            RunConfig.model_validate({**base, "train": {"ema_decay": bad}})
    for engine in ("fastai", "loop"):
        with pytest.raises(ValidationError, match=f"train.ema_decay: engine {engine}"):
            RunConfig.model_validate({**base, "engine": engine, "train": {"ema_decay": 0.9}})
