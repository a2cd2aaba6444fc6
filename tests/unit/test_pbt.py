"""Population-based training's decisions without Ray: what PBT refuses, the mutations Tune
is given, where a trial's leg ends, when a restart continues from another trial's copy, the
lineage saved models carry, and the restored optimizer's rates after an exploit."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from orchestrator.errors import UserError
from orchestrator.search.pbt import check_pbt, mutations, pbt_config
from orchestrator.search.plan import plan_search
from workers.contract.config import RunConfig
from workers.decisions.lineage import Lineage, ancestors_of, exploit_applies, leg_end
from workers.loop.optim import Stepper

SPACE = {"train.lr": {"loguniform": [0.0001, 0.1]}, "train.grad_clip_norm": {"choice": [1, 5]},
         "train.weight_decay": {"uniform": [0.0, 0.1]}}


def config(space=None, epochs=6, **sections) -> RunConfig:
    tune = {"scheduler": "pbt", "perturbation_interval": 2, "num_samples": 4,
            "search_space": space or SPACE, **sections.pop("tune", {})}
    return RunConfig.model_validate({
        "name": "p", "workload": {"entrypoint": "workers.workloads.digits:build"},
        "train": {"epochs": epochs, **sections.pop("train", {})}, "tune": tune, **sections})


@pytest.mark.parametrize(("cfg", "start"), [
    (config({"workload.params.hidden": {"choice": [16, 32]}}),
     "tune.search_space.workload.params.hidden: pbt cannot change it"),
    (config({"train.batch_size": {"grid": [8, 16]}}),
     "tune.search_space.train.batch_size: pbt cannot change it"),
    (config(tune={"search": "optuna"}), "tune.scheduler: pbt changes its trials'"),
    (config(engine="fastai"), "tune.scheduler: pbt needs engine: torch"),
    (config(train={"eval_every_n_steps": 5}), "tune.scheduler: pbt compares trials at epoch"),
    (config(checkpoint={"resume_every_n_epochs": 3}),
     "checkpoint.resume_every_n_epochs: 3 does not divide tune.perturbation_interval 2"),
])
def test_what_pbt_cannot_do_is_refused_naming_the_key(tmp_path, cfg, start):
    with pytest.raises(UserError) as caught:
        plan_search(cfg, str(tmp_path))
    assert str(caught.value).startswith(start), caught.value
    assert "\n" not in str(caught.value)


def test_a_pbt_search_saves_full_state_at_each_comparison_unless_told_a_divisor():
    check_pbt(config())
    assert pbt_config(config()).checkpoint.resume_every_n_epochs == 2
    assert pbt_config(config(checkpoint={"resume_every_n_epochs": 1})
                      ).checkpoint.resume_every_n_epochs == 1
    fifo = config(tune={"scheduler": "fifo"})
    assert pbt_config(fifo) is fifo


def test_tune_is_given_the_space_nested_as_the_trial_config_holds_it():
    tree = mutations(config())["trial"]["config"]["train"]
    assert tree["grad_clip_norm"] == [1, 5]  # a choice: shifted to a neighbour
    random.seed(3)
    lrs = [tree["lr"]() for _ in range(200)]
    decays = [tree["weight_decay"]() for _ in range(200)]
    assert all(0.0001 <= v <= 0.1 for v in lrs) and all(0 <= v <= 0.1 for v in decays)
    # log-uniform: about as many draws below the geometric middle as above it
    assert 70 < sum(v < math.sqrt(0.0001 * 0.1) for v in lrs) < 130


def test_a_leg_ends_at_the_next_comparison_or_the_runs_end():
    assert [leg_end(s, 2, 5) for s in (1, 2, 3, 4, 5)] == [2, 2, 4, 4, 5]
    assert leg_end(1, 3, 10) == 3 and leg_end(10, 3, 10) == 10


def test_an_exploit_applies_only_before_the_trial_trained_past_it():
    assert exploit_applies(3, 0, 2)  # restored at the end of epoch 2 (its own checkpoint)
    assert exploit_applies(1, 0, 2)  # nothing of its own yet
    assert not exploit_applies(4, 0, 2)  # it saved epoch 3 since: continues from that
    assert not exploit_applies(3, 40, 2)  # 40 samples into epoch 3 (a preempted step)


def test_the_lineage_runs_through_every_trial_the_weights_came_through():
    own = Lineage("trial-002")
    assert own.through(3) == [{"trial_id": "trial-002", "epochs": [1, 3]}]
    donor_meta = {"epoch": 2, "lineage": [{"trial_id": "trial-000", "epochs": [1, 2]}]}
    after = Lineage("trial-003", ancestors_of(donor_meta))
    assert after.first_epoch == 3
    assert after.through(4) == [{"trial_id": "trial-000", "epochs": [1, 2]},
                                {"trial_id": "trial-003", "epochs": [3, 4]}]
    again = Lineage("trial-001", ancestors_of({"epoch": 4, "lineage": after.through(4)}))
    assert [s["trial_id"] for s in again.through(6)] == ["trial-000", "trial-003",
                                                         "trial-001"]


def test_an_exploit_scales_the_restored_rates_and_the_schedules_base():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    stepper = Stepper(optimizer, scheduler)
    stepper.mutate(1.2, 0.05)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.006)
    assert scheduler.base_lrs == pytest.approx([0.012])
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    assert stepper.last_lr == pytest.approx(0.006)
    stepper.mutate(None, None)  # no exploit: nothing changes
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.006)


def test_an_exploit_copies_the_donors_checkpoint_and_keeps_the_trials_identity(tmp_path):
    """Tune's own scheduler class and trial objects (no Ray cluster): the worse trial takes the
    donor's checkpoint (copied into its own directory), the donor's perturbed lr, and keeps
    its id, name and directory; the exploit is recorded in pbt.json and told to the console."""
    from ray.tune.experiment import Trial

    from orchestrator.search.pbt import exploit_line, make_pbt
    from orchestrator.search.runner import trial_id_of

    cfg = config({"train.lr": {"loguniform": [0.001, 0.1]}}, epochs=4,
                 storage_path=str(tmp_path))

    def entry(trial_id: str, lr: float) -> dict:
        data = cfg.to_dict()
        data["train"]["lr"], data["name"] = lr, trial_id
        return {"trial": {"trial_id": trial_id, "config": data, "exploit": None}}

    good = Trial("run_trial", config=entry("trial-000", 0.01), stub=True)
    bad = Trial("run_trial", config=entry("trial-001", 0.05), stub=True)
    donor = tmp_path / "trial-000" / "checkpoint_epoch0002_1"
    donor.mkdir(parents=True)
    (donor / "model.safetensors").write_bytes(b"weights")
    (donor / "metadata.json").write_text("{}")
    told = []
    pbt = make_pbt(cfg, lambda trial_id: str(tmp_path / trial_id), trial_id_of, str(tmp_path),
                   seed=1, on_exploit=told.append)

    class Controller:
        search_alg = None
        paused: list = []

        def pause_trial(self, trial, should_checkpoint=True):
            self.paused.append(trial_id_of(trial))

    controller = Controller()
    for trial in (good, bad):
        pbt.on_trial_add(controller, trial)
    pbt._trial_state[good].last_result = {"epoch": 2, "val_loss": 0.1,
                                          "checkpoint_path": str(donor)}
    pbt._trial_state[good].last_score = -0.1
    pbt._trial_state[bad].last_result = {"epoch": 2, "val_loss": 0.5}
    pbt._trial_state[bad].last_score = -0.5
    for trial in (good, bad):
        pbt._checkpoint_or_exploit(trial, controller, [good], [bad])

    copy = tmp_path / "trial-001" / "exploit_epoch0002_from_trial-000"
    assert (copy / "model.safetensors").read_bytes() == b"weights"
    mine = bad.config["trial"]
    assert (mine["trial_id"], mine["config"]["name"]) == ("trial-001", "trial-001")
    assert mine["exploit"] == {"path": str(copy), "epoch": 2, "from": "trial-000"}
    lr = mine["config"]["train"]["lr"]
    assert lr != 0.05 and (lr in (0.01 * 0.8, 0.01 * 1.2) or 0.001 <= lr <= 0.1)
    assert good.config["trial"]["config"]["train"]["lr"] == 0.01  # the donor is untouched
    assert controller.paused == ["trial-001"]
    recorded = json.loads((tmp_path / "pbt.json").read_text())["exploits"]
    assert recorded == told and len(told) == 1
    assert recorded[0] | {"after": None} == {
        "trial_id": "trial-001", "epoch": 2, "from_trial": "trial-000",
        "from_checkpoint": str(donor), "copy": str(copy), "before": {"train.lr": 0.05},
        "after": None, "val_loss": 0.5, "from_val_loss": 0.1}
    assert exploit_line(told[0]).startswith(
        "[trial-001] continues from trial-000's epoch 2 (pbt exploit): train.lr 0.05 -> ")


def test_a_resumed_trial_goes_on_with_its_last_exploits_values_and_copy():
    from orchestrator.search.pbt import resumed_trial

    data = config().to_dict()
    exploits = [
        {"trial_id": "trial-001", "epoch": 2, "from_trial": "trial-000", "copy": "/c/1",
         "before": {"train.lr": 0.05}, "after": {"train.lr": 0.012}},
        {"trial_id": "trial-002", "epoch": 2, "from_trial": "trial-000", "copy": "/c/2",
         "before": {"train.lr": 0.04}, "after": {"train.lr": 0.008}},
        {"trial_id": "trial-001", "epoch": 4, "from_trial": "trial-003", "copy": "/c/3",
         "before": {"train.lr": 0.012}, "after": {"train.lr": 0.02}},
    ]
    resumed, exploit = resumed_trial(data, "trial-001", exploits)
    assert resumed["train"]["lr"] == 0.02 and data["train"]["lr"] != 0.02
    assert exploit == {"path": "/c/3", "epoch": 4, "from": "trial-003"}
    assert resumed_trial(data, "trial-000", exploits) == (data, None)


def test_no_more_trials_run_or_start_at_once_than_max_concurrent_trials(tmp_path):
    """Tune's own max_concurrent_trials would deadlock a synchronous PBT (a paused trial counts
    as live, so the trials it waits for are never created): the scheduler holds trials back
    itself, the least trained first."""
    from ray.tune.experiment import Trial

    from orchestrator.search.pbt import make_pbt
    from orchestrator.search.runner import trial_id_of

    cfg = config(tune={"max_concurrent_trials": 2}, storage_path=str(tmp_path))
    trials = [Trial("run_trial", config={"trial": {"trial_id": f"trial-{i:03d}"}}, stub=True)
              for i in range(4)]
    pbt = make_pbt(cfg, lambda trial_id: str(tmp_path / trial_id), trial_id_of,
                   str(tmp_path), seed=1)

    class Controller:
        search_alg = None

        def get_trials(self):
            return trials

    controller = Controller()
    for trial in trials:
        pbt.on_trial_add(controller, trial)
    chosen = [pbt.choose_trial_to_run(controller) for _ in range(3)]
    assert [trial_id_of(t) if t else None for t in chosen] == ["trial-000", "trial-001", None]
    trials[0].status = trials[1].status = Trial.RUNNING
    assert pbt.choose_trial_to_run(controller) is None
    # trial-000 reached the comparison at epoch 2 and waits there, paused.
    trials[0].status = Trial.PAUSED
    pbt._trial_state[trials[0]].last_train_time = 2
    assert trial_id_of(pbt.choose_trial_to_run(controller)) == "trial-002"
    assert pbt.choose_trial_to_run(controller) is None  # trial-001 runs, trial-002 starts


def test_only_the_end_of_a_leg_is_compared(tmp_path):
    """A result between comparisons (a model saved at an odd epoch, say), the run's last epoch
    and a preemption's report (no metric) never reach Tune's PBT: a trial is never compared,
    nor copied from, where it has no full-state checkpoint."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from orchestrator.search.pbt import make_pbt
    from orchestrator.search.runner import trial_id_of

    cfg = config(storage_path=str(tmp_path))  # 6 epochs, compared every 2
    trial = Trial("run_trial", config={"trial": {"trial_id": "trial-000"}}, stub=True)
    pbt = make_pbt(cfg, lambda trial_id: str(tmp_path / trial_id), trial_id_of,
                   str(tmp_path), seed=1)

    class Controller:
        search_alg = None

    pbt.on_trial_add(Controller(), trial)
    for result in ({"epoch": 3, "val_loss": 0.2}, {"epoch": 6, "val_loss": 0.1},
                   {"epoch": 4, "preempted": 1}):
        assert pbt.on_trial_result(Controller(), trial, result) == TrialScheduler.CONTINUE
    assert pbt._trial_state[trial].last_result is None  # nothing was recorded for comparing
