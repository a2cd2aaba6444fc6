"""Search spaces: parsed, validated and sampled before any trial starts. Pure logic.

``tune.search_space`` maps dotted config keys to one distribution each::

    train.lr: {loguniform: [0.0001, 0.01]}
    workload.params.hidden: {choice: [32, 64, 128]}
    train.batch_size: {grid: [32, 64]}

Under ``tune.search: random`` and ``grid`` trials are drawn up front with the search seed
(Tune's semantics: every grid combination, ``num_samples`` times, the other keys sampled for
each), written to ``search.json`` and validated against the config schema one by one, so a
bad value fails before any training and an interrupted search resumes with exactly the same
trials. Under ``optuna`` each trial is proposed as results come in (``search.adaptive``); its
options and bounds are validated up front instead.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class SearchSpaceError(ValueError):
    pass


@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    values: tuple[Any, ...]  # the options (choice, grid) or the bounds (low, high)


def parse_param(key: str, spec: Any) -> Param:
    where = f"tune.search_space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SearchSpaceError(
            f"{where}: expected one of {{{', '.join(KINDS)}}} with its values, e.g. "
            "{choice: [32, 64]} or {loguniform: [0.0001, 0.01]}"
        )
    (kind, values), = spec.items()
    if kind not in KINDS:
        raise SearchSpaceError(f"{where}: unknown distribution {kind!r}; use one of "
                               f"{', '.join(KINDS)}")
    if not isinstance(values, list):
        raise SearchSpaceError(f"{where}.{kind}: expected a list, got {values!r}")
    if kind in ("choice", "grid"):
        if not values:
            raise SearchSpaceError(f"{where}.{kind}: needs at least one value")
        return Param(key, kind, tuple(values))
    if len(values) != 2 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in values
    ):
        raise SearchSpaceError(f"{where}.{kind}: expected [low, high] numbers, got {values!r}")
    low, high = values
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        raise SearchSpaceError(f"{where}.randint: bounds must be integers, got {values!r}")
    if low >= high:
        raise SearchSpaceError(f"{where}.{kind}: low must be below high, got {values!r}")
    if kind == "loguniform" and low <= 0:
        raise SearchSpaceError(f"{where}.loguniform: low must be > 0, got {low!r}")
    return Param(key, kind, (low, high))


def parse_space(space: dict[str, Any]) -> list[Param]:
    if not space:
        raise SearchSpaceError("tune.search_space: empty; give at least one dotted config key, "
                               "e.g. train.lr: {loguniform: [0.0001, 0.01]}")
    return [parse_param(key, spec) for key, spec in space.items()]


def _sample(param: Param, rng: np.random.Generator) -> Any:
    low_high = param.values
    if param.kind == "choice":
        return param.values[int(rng.integers(len(param.values)))]
    if param.kind == "uniform":
        return float(rng.uniform(*low_high))
    if param.kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(low_high[0]), math.log(low_high[1]))))
    return int(rng.integers(low_high[0], low_high[1]))  # randint: high exclusive, as Tune


SEARCHES = ("random", "grid", "optuna")
PARAMS_KEY = "params"  # a proposed trial's values, in its Tune config
# What Optuna's CategoricalDistribution can hold.
OPTUNA_CHOICE_TYPES = (str, int, float, bool, type(None))


def check_search(params: list[Param], search: str) -> None:
    """Whether ``tune.search`` can take every key of the space (pure: before any trial)."""
    for param in params:
        where = f"tune.search_space.{param.key}"
        if search == "grid" and param.kind not in ("grid", "choice"):
            raise SearchSpaceError(
                f"{where}: tune.search grid enumerates values, and {param.kind} is a range; "
                "give {grid: [...]} or {choice: [...]}, or use tune.search random or optuna")
        if search == "optuna" and param.kind == "grid":
            raise SearchSpaceError(
                f"{where}: tune.search optuna proposes every value itself and cannot take "
                "{grid: [...]}; give {choice: [...]} instead, or use tune.search random or grid")
        if search == "optuna" and param.kind == "choice":
            bad = [v for v in param.values if not isinstance(v, OPTUNA_CHOICE_TYPES)]
            if bad:
                raise SearchSpaceError(
                    f"{where}.choice: Optuna can choose only among strings, numbers, booleans "
                    f"and null, not {bad[0]!r}; use tune.search random or grid for this key")


def sample_trials(params: list[Param], num_samples: int, seed: int,
                  search: str = "random") -> list[dict[str, Any]]:
    """Every grid combination x ``num_samples``; the other keys drawn from ``seed``. Under
    ``search: grid`` the choice keys are enumerated too."""
    rng = np.random.default_rng(seed)
    enumerated = ("grid", "choice") if search == "grid" else ("grid",)
    grid = [p for p in params if p.kind in enumerated]
    rest = [p for p in params if p.kind not in enumerated]
    combos = list(itertools.product(*(p.values for p in grid))) or [()]
    trials = []
    for _ in range(num_samples):
        for combo in combos:
            overrides = {p.key: v for p, v in zip(grid, combo, strict=True)}
            overrides.update({p.key: _sample(p, rng) for p in rest})
            trials.append({k: overrides[k] for k in (p.key for p in params)})
    return trials


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SearchSpaceError(f"tune.search_space.{key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def boundary_values(param: Param) -> tuple[Any, ...]:
    """Values to validate before any trial: every option, or both bounds."""
    if param.kind == "randint":
        return (param.values[0], param.values[1] - 1)
    return param.values


@dataclass(frozen=True)
class Trial:
    trial_id: str
    overrides: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "overrides": self.overrides}


def make_trials(overrides: list[dict[str, Any]]) -> list[Trial]:
    width = max(3, len(str(len(overrides) - 1)))
    return [Trial(f"trial-{i:0{width}d}", o) for i, o in enumerate(overrides)]
