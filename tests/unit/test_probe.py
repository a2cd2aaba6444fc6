"""The search's probe (``workers.loop.probe.check_monitor``, run once on a Ray worker before
any trial and before the search's directory is touched), in one process: under the torch
engine it runs the first batch through the model and the loss as the torch loop does, so a
loss_fn that cannot score a batch is one line before an ``--overwrite`` deletes anything. The
directions its metric objects declare resolve, and are pinned into every trial's config, for
``tracker.monitor`` and each ``tracker.also_monitor`` alike (``search.runner``)."""

from __future__ import annotations

import pytest

from orchestrator.errors import UserError
from orchestrator.search.runner import pin_direction, resolve_directions
from tests.workloads.mistakes import EXPECTED
from workers.contract.config import RunConfig
from workers.contract.direction import by_name
from workers.contract.user_errors import UserInputError
from workers.loop.probe import check_monitor, check_search


def config(mistake: str) -> dict:
    return RunConfig.model_validate({
        "workload": {"entrypoint": "tests.workloads.mistakes:build",
                     "params": {"mistake": mistake}}}).to_dict()


@pytest.mark.filterwarnings("ignore:size_average and reduce args")  # the class, called
def test_a_loss_fn_that_cannot_score_the_first_batch_is_found_by_the_probe() -> None:
    with pytest.raises(UserInputError) as err:
        check_monitor(config("loss_class"))
    assert EXPECTED["loss_class"] in str(err.value)
    assert "\n" not in str(err.value)


def test_a_sound_workload_passes_and_the_optimizer_is_left_to_the_trials() -> None:
    assert check_monitor(config("none")) == {}
    # The probe never makes an optimizer: that mistake is a trial's to find
    # (tests/integration/test_search_overwrite.py).
    assert check_monitor(config("not_an_optimizer")) == {}


def search_config(kind: str, tracker: dict) -> RunConfig:
    return RunConfig.model_validate({
        "workload": {"entrypoint": "tests.workloads.directions:build", "params": {"kind": kind}},
        "tracker": tracker})


def test_a_search_resolves_each_also_monitor_as_a_run_does_and_pins_it_in_every_trial() -> None:
    # val_cls_prec: no word of the name table ('prec'), so only MulticlassPrecision's own
    # higher_is_better can place it; val_mse: MeanSquaredError declares lower is better.
    assert by_name("val_cls_prec") is None
    cfg = search_config("collection", {"monitor": "val_cls_acc",
                                       "also_monitor": [{"monitor": "val_cls_prec"},
                                                        {"monitor": "val_loss"},
                                                        {"monitor": "val_cls_rec",
                                                         "mode": "min"}]})
    declared, ray_datasets = check_search(cfg.to_dict())
    assert not ray_datasets
    assert declared["val_cls_prec"] == (True, "MulticlassPrecision")
    resolved = resolve_directions(cfg, declared)
    assert resolved.primary.mode == "max" and "MulticlassAccuracy" in resolved.primary.source
    assert resolved.also == ("max", "min", "min")  # declared, by name, as set
    trials = [cfg.model_copy(deep=True) for _ in range(2)]
    pin_direction(resolved, cfg, *trials)
    for pinned in (cfg, *trials):
        assert pinned.tracker.mode == "max"
        assert [a.mode for a in pinned.tracker.also_monitor] == ["max", "min", "min"]
    again = RunConfig.model_validate(trials[0].to_dict())  # as a trial's Ray config
    assert [a.mode for a in again.tracker.also_monitor] == ["max", "min", "min"]

    regression = search_config("regression", {"monitor": "val_loss",
                                              "also_monitor": [{"monitor": "val_mse"}]})
    assert resolve_directions(regression, check_search(regression.to_dict())[0]).also == (
        "min",)


def test_an_also_monitor_nothing_places_is_refused_naming_its_key() -> None:
    cfg = search_config("collection", {"monitor": "val_cls_acc",
                                       "also_monitor": [{"monitor": "val_cls_prec"}]})
    with pytest.raises(UserError, match=r"^tracker\.also_monitor: tracker\.mode: auto cannot"):
        resolve_directions(cfg, {})  # what a probe that could not build the workload gives
