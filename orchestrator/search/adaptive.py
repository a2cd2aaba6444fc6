"""Adaptive search (``tune.search: optuna``): each trial proposed by Optuna's TPE sampler from
the trials finished so far, through Ray Tune's ``OptunaSearch``.

- The searcher learns each trial's best monitored value (the tracker's: the value of its
  latest improving evaluation), never its last one, also for a trial that ASHA stopped.
- Proposals are reproducible: the sampler is made afresh for every trial, seeded from the
  search seed and the trial's number, so proposal ``n`` depends only on the seed and on the
  results the study holds when it is asked.
- A resumed search rebuilds the study from the project's own records, never from Tune's
  pickled state (Ray #30861, #14667): the trials proposed (``search.json``) in their order,
  finished ones as observations with the best value in their done file, unfinished ones
  enqueued to run again with the same values (each resumes from its checkpoints).
- ``searcher.json`` holds the study's own trial records, rewritten as trials end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, TPESampler
from ray.tune.result import DEFAULT_METRIC
from ray.tune.search.optuna import OptunaSearch

from orchestrator.search.space import PARAMS_KEY, Param
from workers.contract.config import RunConfig

STUDY_NAME = "search"
TOLD = DEFAULT_METRIC  # what the searcher is told of a trial: its best monitored value


def startup_trials(cfg: RunConfig) -> int:
    """Trials drawn at random before TPE proposes from results."""
    if cfg.tune.startup_trials is not None:
        return cfg.tune.startup_trials
    return max(1, min(10, cfg.tune.num_samples // 4))


def distributions(params: list[Param]) -> dict[str, Any]:
    """The search space as Optuna's distributions, under Tune's flattened config keys
    (``params/<dotted key>``); ``randint``'s high stays exclusive, as in the other searches."""
    out: dict[str, Any] = {}
    for p in params:
        if p.kind == "choice":
            dist: Any = CategoricalDistribution(list(p.values))
        elif p.kind == "randint":
            dist = IntDistribution(p.values[0], p.values[1] - 1)
        elif p.kind in ("uniform", "loguniform"):
            dist = FloatDistribution(float(p.values[0]), float(p.values[1]),
                                     log=p.kind == "loguniform")
        else:  # refused before: check_search
            raise ValueError(f"optuna cannot take {p.kind}")
        out[f"{PARAMS_KEY}/{p.key}"] = dist
    return out


def trial_seed(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededTPE(BaseSampler):
    """Optuna's TPE sampler, made afresh for each trial with a seed of its own (from the
    search seed and the trial's number)."""

    def __init__(self, seed: int, startup: int) -> None:
        self.seed, self.startup = seed, startup
        self.inner = self._tpe(0)

    def _tpe(self, number: int) -> TPESampler:
        return TPESampler(seed=trial_seed(self.seed, number), n_startup_trials=self.startup)

    def before_trial(self, study: Any, trial: Any) -> None:
        self.inner = self._tpe(trial.number)
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
        return self.inner.sample_independent(study, trial, name, dist)

    def after_trial(self, study: Any, trial: Any, state: Any,
                    values: Sequence[float] | None) -> None:
        self.inner.after_trial(study, trial, state, values)


@dataclass(frozen=True)
class Observation:
    """A trial proposed earlier, as the resumed study must hold it. ``state``: complete (with
    its best value), fail (errored) or pending (to run again with the same values)."""

    overrides: dict[str, Any]
    state: str
    value: float | None = None


def make_study(cfg: RunConfig, params: list[Param], seed: int,
               earlier: list[Observation]) -> tuple[Any, Any]:
    """The Optuna study (and its in-memory storage, which the searcher joins), holding the
    trials proposed earlier in their order: numbers, and so proposals, stay as they were."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.InMemoryStorage()
    direction: Literal["minimize", "maximize"] = (
        "minimize" if cfg.tracker.resolved_mode == "min" else "maximize")
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=direction,
                                sampler=TrialSeededTPE(seed, startup_trials(cfg)))
    dists = distributions(params)
    for obs in earlier:
        values = {f"{PARAMS_KEY}/{k}": v for k, v in obs.overrides.items()}
        if obs.state == "pending":
            study.enqueue_trial(values)
            continue
        complete = obs.state == "complete" and obs.value is not None
        state = optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.FAIL
        study.add_trial(optuna.trial.create_trial(
            state=state, value=obs.value if complete else None, params=values,
            distributions=dists))
    return study, storage


class BestValueOptunaSearch(OptunaSearch):
    """Ray Tune's ``OptunaSearch`` on an existing study, told each trial's best monitored
    value, never its last. The tracker's improvements only get better, so its best is the
    better of the trial's recorded best (``best_value``: its history, which also holds the
    improvements made before a restart) and the improving results seen here.

    Tune's own copy of the searcher's state is not written: a resume rebuilds the study from
    the project's records (``make_study``)."""

    def __init__(self, cfg: RunConfig, params: list[Param], study: Any, storage: Any, *,
                 best_value: Callable[[str], float | None]) -> None:
        # The metric it is told is computed here (TOLD), not a key of every result: Tune
        # checks each result for a searcher's metric, and a trial's last result, when its
        # function returns, holds no metrics.
        super().__init__(space=distributions(params), metric=TOLD,
                         mode=cfg.tracker.resolved_mode, sampler=study.sampler,
                         study_name=STUDY_NAME, storage=storage)
        self.monitor = cfg.tracker.monitor
        self.best_value = best_value
        self.seen: dict[str, float] = {}

    def _note(self, trial_id: str, result: dict[str, Any] | None) -> None:
        if result and result.get("is_best") and self.monitor in result:
            self.seen[trial_id] = float(result[self.monitor])

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._note(trial_id, result)  # no pruner: intermediate values are not needed

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        self._note(trial_id, result)
        found = [v for v in (self.seen.get(trial_id), self.best_value(trial_id))
                 if v is not None]
        best = (min if self.mode == "min" else max)(found) if found else None
        super().on_trial_complete(
            trial_id, None if error or best is None else {TOLD: best}, error=error)

    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError("a search is resumed from its own records (make_study)")


def study_records(study: Any) -> list[dict[str, Any]]:
    """The study's own trial records (what the sampler proposed from), as JSON."""
    prefix = f"{PARAMS_KEY}/"
    return [{
        "number": t.number,
        "state": t.state.name.lower(),
        "params": {k.removeprefix(prefix): v for k, v in t.params.items()},
        "value": t.value,
        "started": t.datetime_start.isoformat() if t.datetime_start else None,
        "completed": t.datetime_complete.isoformat() if t.datetime_complete else None,
    } for t in study.get_trials(deepcopy=False)]


class TrialNamer:
    """Tune's ``trial_name_creator``: the project's trial ids, in the order trials are
    proposed. A trial enqueued again on a resume (its values those of an unfinished trial)
    keeps its id, and with it its run directory and checkpoints. Plain data: Tune pickles it
    with its experiment state."""

    def __init__(self, pending: list[tuple[str, dict[str, Any]]], next_index: int,
                 width: int) -> None:
        self.pending = list(pending)
        self.next_index = next_index
        self.width = width
        self.names: dict[str, str] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> TrialNamer:
        return self  # Tune deep-copies its experiment spec for every trial: one namer

    def __call__(self, trial: Any) -> str:
        if trial.trial_id not in self.names:
            self.names[trial.trial_id] = self.name_for(trial.config.get(PARAMS_KEY, {}))
        return self.names[trial.trial_id]

    def name_for(self, overrides: dict[str, Any]) -> str:
        for i, (trial_id, values) in enumerate(self.pending):
            if values == overrides:
                del self.pending[i]
                return trial_id
        name = f"trial-{self.next_index:0{self.width}d}"
        self.next_index += 1
        return name


def id_width(num_samples: int) -> int:
    return max(3, len(str(num_samples - 1)))
