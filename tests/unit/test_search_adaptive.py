"""An adaptive search's decisions without Ray: the space mapped to Optuna's, which searcher
takes which kinds of key, proposals that are reproducible from the seed and the results, a
study rebuilt on a resume, the best value (never the last) told to the sampler, and the
names given to proposed trials."""

from __future__ import annotations

import copy
import math

import optuna
import pytest

from orchestrator.errors import UserError
from orchestrator.search.adaptive import (
    BestValueOptunaSearch,
    Observation,
    TrialNamer,
    distributions,
    make_study,
    startup_trials,
    study_records,
)
from orchestrator.search.plan import plan_search
from orchestrator.search.space import PARAMS_KEY, parse_space, sample_trials
from workers.contract.config import RunConfig

SPACE = {"train.lr": {"loguniform": [0.0001, 0.1]},
         "workload.params.hidden": {"choice": [16, 32, 64]},
         "train.batch_size": {"randint": [8, 65]}}


def config(space=None, **tune) -> RunConfig:
    return RunConfig.model_validate({
        "name": "s", "workload": {"entrypoint": "workers.workloads.digits:build"},
        "tune": {"search": "optuna", "num_samples": 8, "startup_trials": 2,
                 "search_space": space or SPACE, **tune}})


def objective(overrides: dict) -> float:
    """A smooth stand-in for a trial's best val_loss: best near lr=0.01, hidden=32."""
    return (math.log10(overrides["train.lr"]) + 2) ** 2 + abs(
        overrides["workload.params.hidden"] - 32) / 32 + overrides["train.batch_size"] / 1000


def run_sequentially(cfg: RunConfig, n: int, earlier: list[Observation] = (),
                     values=objective) -> list[dict]:
    """What a search with one trial at a time asks and tells: its proposals, in order."""
    params = parse_space(cfg.tune.search_space)
    study, _ = make_study(cfg, params, 7, list(earlier))
    proposed = []
    for _ in range(n):
        trial = study.ask(distributions(params))
        overrides = {k.removeprefix(f"{PARAMS_KEY}/"): v for k, v in trial.params.items()}
        proposed.append(overrides)
        study.tell(trial, values(overrides))
    return proposed


def test_the_space_maps_to_optunas_distributions_with_randint_high_exclusive():
    dists = distributions(parse_space(SPACE))
    assert dists["params/train.lr"] == optuna.distributions.FloatDistribution(0.0001, 0.1,
                                                                             log=True)
    assert dists["params/workload.params.hidden"].choices == (16, 32, 64)
    assert dists["params/train.batch_size"] == optuna.distributions.IntDistribution(8, 64)


def test_startup_trials_default_to_a_quarter_of_the_search():
    assert startup_trials(config(startup_trials=None)) == 2
    assert startup_trials(config(startup_trials=None, num_samples=100)) == 10
    assert startup_trials(config(startup_trials=None, num_samples=2)) == 1
    assert startup_trials(config(startup_trials=5)) == 5


@pytest.mark.parametrize(("search", "space", "named"), [
    ("optuna", {"train.lr": {"grid": [0.1, 0.01]}}, r"tune\.search_space\.train\.lr: .*grid"),
    ("optuna", {"workload.params.layers": {"choice": [[32, 16], [64]]}},
     r"tune\.search_space\.workload\.params\.layers\.choice: Optuna can choose only"),
    ("grid", {"train.lr": {"uniform": [0.001, 0.1]}}, r"tune\.search_space\.train\.lr: .*range"),
])
def test_a_searcher_refuses_a_kind_it_cannot_take_naming_the_key(tmp_path, search, space,
                                                                  named):
    # startup_trials is optuna's alone: given with another search, the config is refused.
    cfg = config(space, search=search, startup_trials=2 if search == "optuna" else None)
    with pytest.raises(UserError, match=named) as raised:
        plan_search(cfg, str(tmp_path))
    assert "\n" not in str(raised.value)


def test_grid_search_enumerates_choices_and_grids():
    params = parse_space({"a": {"choice": [1, 2]}, "b": {"grid": ["x", "y", "z"]}})
    trials = sample_trials(params, 1, 0, "grid")
    assert sorted((t["a"], t["b"]) for t in trials) == sorted(
        (a, b) for a in (1, 2) for b in ("x", "y", "z"))


def test_proposals_are_reproducible_and_learn_from_the_results():
    cfg = config()
    first = run_sequentially(cfg, 8)
    assert run_sequentially(cfg, 8) == first  # the same seed and results: the same trials
    assert len({tuple(sorted(p.items())) for p in first}) == 8
    # The startup trials are drawn at random; the later ones are proposed from the results:
    # the same seed with other results gives the same first two trials, then others.
    upside_down = run_sequentially(cfg, 8, values=lambda o: -objective(o))
    assert upside_down[:2] == first[:2]
    assert upside_down[2:] != first[2:]


def test_a_rebuilt_study_proposes_what_the_uninterrupted_one_did():
    """A resume: three trials finished (observed with their values), the fourth interrupted
    (enqueued with its values): the study asks the fourth again, then the same proposals."""
    cfg = config()
    reference = run_sequentially(cfg, 8)
    earlier = [Observation(o, "complete", objective(o)) for o in reference[:3]]
    earlier.append(Observation(reference[3], "pending"))
    params = parse_space(cfg.tune.search_space)
    study, _ = make_study(cfg, params, 7, earlier)
    assert [r["state"] for r in study_records(study)] == ["complete"] * 3 + ["waiting"]
    assert [r["value"] for r in study_records(study)][:3] == [objective(o)
                                                              for o in reference[:3]]
    resumed = []
    for _ in range(5):
        trial = study.ask(distributions(params))
        overrides = {k.removeprefix(f"{PARAMS_KEY}/"): v for k, v in trial.params.items()}
        resumed.append(overrides)
        study.tell(trial, objective(overrides))
    assert resumed == reference[3:]


def test_the_sampler_is_told_each_trials_best_value_never_its_last():
    cfg = config()
    params = parse_space(cfg.tune.search_space)
    study, storage = make_study(cfg, params, 7, [])
    recorded = {"t1": None, "t2": 0.05}  # t2's history: an improvement before a restart
    searcher = BestValueOptunaSearch(cfg, params, study, storage, best_value=recorded.get)
    for trial_id, results in {
        "t1": [(0.5, True), (0.3, True), (0.4, False)],
        "t2": [(0.2, False), (0.1, False)],
    }.items():
        searcher.suggest(trial_id)
        for epoch, (value, is_best) in enumerate(results, start=1):
            searcher.on_trial_result(trial_id, {"val_loss": value, "is_best": is_best,
                                                "epoch": epoch, "training_iteration": epoch})
        searcher.on_trial_complete(trial_id, {"val_loss": results[-1][0], "is_best": False})
    searcher.suggest("t3")
    searcher.on_trial_complete("t3", None, error=True)
    assert [(r["state"], r["value"]) for r in study_records(study)] == [
        ("complete", 0.3), ("complete", 0.05), ("fail", None)]


def test_proposed_trials_are_named_in_order_and_a_resumed_one_keeps_its_name():
    namer = TrialNamer([("trial-002", {"train.lr": 0.01})], next_index=3, width=3)

    class Proposed:
        def __init__(self, tune_id, values):
            self.trial_id, self.config = tune_id, {PARAMS_KEY: values}

    assert namer(Proposed("a", {"train.lr": 0.01})) == "trial-002"
    assert namer(Proposed("b", {"train.lr": 0.02})) == "trial-003"
    assert namer(Proposed("c", {"train.lr": 0.01})) == "trial-004"  # enqueued once only
    assert namer(Proposed("b", {"train.lr": 0.02})) == "trial-003"  # asked again: the same
    # Tune deep-copies its experiment spec for each trial it creates: still the one namer.
    assert copy.deepcopy(namer) is namer
