"""The search's probe (``workers.loop.probe.check_monitor``, run once on a Ray worker before
any trial and before the search's directory is touched), in one process: under the torch
engine it runs the first batch through the model and the loss as the torch loop does, so a
loss_fn that cannot score a batch is one line before an ``--overwrite`` deletes anything."""

from __future__ import annotations

import pytest

from tests.workloads.mistakes import EXPECTED
from workers.contract.config import RunConfig
from workers.contract.user_errors import UserInputError
from workers.loop.probe import check_monitor


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
