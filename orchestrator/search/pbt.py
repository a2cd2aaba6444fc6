"""Population-based training (``tune.scheduler: pbt``) on Ray Tune's own scheduler.

Ray Tune's ``PopulationBasedTraining`` runs synchronously (``synch=True``): every
``tune.perturbation_interval`` epochs all trials stop at the same epoch (the end of a *leg*:
the workers train up to it and the trial waits there, ``decisions.lineage.leg_end``), the
population is compared on the monitored value of that epoch, and each trial of the worst
quarter continues from a trial of the best quarter (*exploit*) with perturbed
hyperparameters (*explore*: a choice shifted to a neighbour, a number times 0.8 or 1.2, or
drawn again with probability 0.25).

What the project adds to Tune's scheduler (through ``workers.compat.pbt_scheduler``, which
overrides the private methods this needs):

- Tune would copy a Tune checkpoint; trials report theirs to Ray Train instead. The donor's
  full-state checkpoint of that epoch (the trial config saves one every
  ``perturbation_interval`` epochs) is copied into the exploiting trial's own directory
  (``exploit_epochNNNN_from_<trial>``: the donor may delete its own later), and the trial
  restarts from the copy with the donor's weights, optimizer, schedule and epoch, but its own
  tracker: its best so far stays its best, and every model it saves says in its metadata
  which trials and epochs its weights came through (``lineage``).
- A trial keeps its own id and directory: only the mutated keys come from the donor.
- The exploits are recorded in ``pbt.json`` (trial, epoch, donor, values before and after).
- The choices (which donor, which perturbation) come from the search seed.

Only keys that can change on weights trained by another trial can be searched:
``train.lr`` (the restored optimizer's rates and its schedule's are scaled to it),
``train.weight_decay`` and ``train.grad_clip_norm``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import posixpath
import random
from collections.abc import Callable, Iterator
from typing import Any

from orchestrator import storage
from orchestrator.errors import UserError
from orchestrator.search.space import Param, parse_space, set_dotted
from workers.compat import PBTHooks, pbt_scheduler
from workers.contract.config import RunConfig
from workers.contract.names import EXPLOIT_PREFIX, METADATA_FILE, PBT_FILE

MUTABLE = ("train.lr", "train.weight_decay", "train.grad_clip_norm")


def check_pbt(cfg: RunConfig) -> None:
    """What PBT cannot do, refused before any trial (one line each)."""
    t = cfg.tune
    if t.scheduler != "pbt":
        return
    if t.search == "optuna":
        raise UserError("tune.scheduler: pbt changes its trials' hyperparameters as they train "
                        "and cannot take trials from optuna, which learns from finished ones; "
                        "use tune.search random or grid")
    if cfg.engine != "torch":
        raise UserError(f"tune.scheduler: pbt needs engine: torch (the project's loop, whose "
                        f"optimizer it perturbs), not {cfg.engine}")
    if cfg.train.max_steps or cfg.train.eval_every_n_steps:
        raise UserError("tune.scheduler: pbt compares trials at epoch ends; remove "
                        "train.max_steps and train.eval_every_n_steps")
    # perturbation_interval against train.epochs: in the schema (RunConfig).
    resume_every = cfg.checkpoint.resume_every_n_epochs
    if resume_every and t.perturbation_interval % resume_every:
        raise UserError(
            f"checkpoint.resume_every_n_epochs: {resume_every} does not divide "
            f"tune.perturbation_interval {t.perturbation_interval}: an exploiting trial "
            "continues from the full-state checkpoint of the epoch the trials are compared at; "
            "use a divisor, or 0 (then one every perturbation_interval epochs)")
    if not t.search_space:
        raise UserError(f"tune.search_space: pbt perturbs its keys and it is empty; give one of "
                        f"{', '.join(MUTABLE)}")
    for key in t.search_space:
        if key not in MUTABLE:
            raise UserError(
                f"tune.search_space.{key}: pbt cannot change it while a trial trains (a trial "
                f"continues from another's weights); it can mutate {', '.join(MUTABLE)}; "
                "search the rest with tune.scheduler fifo or asha")


def pbt_config(cfg: RunConfig) -> RunConfig:
    """The search's config under PBT: full-state checkpoints every perturbation_interval
    epochs unless a divisor was set (what an exploiting trial continues from)."""
    if cfg.tune.scheduler != "pbt" or cfg.checkpoint.resume_every_n_epochs:
        return cfg
    data = cfg.to_dict()
    data["checkpoint"]["resume_every_n_epochs"] = cfg.tune.perturbation_interval
    return RunConfig.model_validate(data)


def resampler(param: Param) -> Any:
    """A key's values for Tune's explore step: the options (shifted to a neighbour), or a
    function drawing from the range with the ``random`` module (seeded by ``make_pbt``)."""
    low, high = (param.values + (None, None))[:2]
    if param.kind in ("choice", "grid"):
        return list(param.values)
    if param.kind == "uniform":
        return lambda: random.uniform(low, high)
    if param.kind == "loguniform":
        return lambda: math.exp(random.uniform(math.log(low), math.log(high)))
    return lambda: random.randrange(int(low), int(high))  # randint: high exclusive


def mutations(cfg: RunConfig) -> dict[str, Any]:
    """Tune's ``hyperparam_mutations``, nested as the trial's Tune config holds its config."""
    tree: dict[str, Any] = {}
    for param in parse_space(cfg.tune.search_space):
        set_dotted(tree, param.key, resampler(param))
    return {"trial": {"config": tree}}


def get_dotted(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def earlier_exploits(experiment_dir: str) -> list[dict[str, Any]]:
    """The exploits recorded before a ``--resume`` (none in a fresh search)."""
    path = storage.join(experiment_dir, PBT_FILE)
    return storage.read_json(path)["exploits"] if storage.exists(path) else []


def resumed_trial(config: dict[str, Any], trial_id: str, exploits: list[dict[str, Any]]
                  ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A trial's config and exploit after its last recorded exploit (a ``--resume``): the
    mutated values, and the copy it continues from unless it trained past it since."""
    last = next((e for e in reversed(exploits) if e["trial_id"] == trial_id), None)
    if last is None:
        return config, None
    config = copy.deepcopy(config)
    for key, value in last["after"].items():
        set_dotted(config, key, value)
    return config, {"path": last["copy"], "epoch": last["epoch"], "from": last["from_trial"]}


def exploit_line(exploit: dict[str, Any]) -> str:
    """The console's line for one exploit."""
    def shown(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    changed = ", ".join(f"{key} {shown(exploit['before'][key])} -> {shown(value)}"
                        for key, value in exploit["after"].items())
    return (f"[{exploit['trial_id']}] continues from {exploit['from_trial']}'s epoch "
            f"{exploit['epoch']} (pbt exploit): {changed}")


def copy_checkpoint(source: str, target: str) -> None:
    """The donor's checkpoint files (hard links on a local disk: checkpoint files are never
    rewritten, and the donor may delete its own), the metadata last (what marks the copy
    whole)."""
    names = sorted(storage.list_files(source), key=lambda name: name == METADATA_FILE)
    for name in names:
        storage.link_or_copy(storage.join(source, name), storage.join(target, name))


def make_pbt(cfg: RunConfig, run_dir_of: Callable[[str], str], trial_id_of: Callable[[Any], str],
             experiment_dir: str, seed: int,
             on_exploit: Callable[[dict[str, Any]], None] = lambda exploit: None) -> Any:
    """Ray Tune's PBT scheduler for a fresh search, as the module docstring says (a resumed one
    finishes without it: ``search.runner.resumed_pbt``); ``on_exploit`` is told each exploit's
    record."""
    import logging

    from ray.tune import Checkpoint

    # Tune's own multi-line account of each exploit: the console line and pbt.json say it.
    logging.getLogger("ray.tune.schedulers.pbt").setLevel(logging.WARNING)
    keys = list(cfg.tune.search_space)
    exploits: list[dict[str, Any]] = []
    rng = random.Random(seed)
    pending: dict[str, Any] = {}

    @contextlib.contextmanager
    def seeded() -> Iterator[None]:
        """Tune's explore step draws from the ``random`` module: from the search seed here."""
        outside = random.getstate()
        random.setstate(rng.getstate())
        try:
            yield
        finally:
            rng.setstate(random.getstate())
            random.setstate(outside)

    def checkpoint_of(result: dict[str, Any]) -> str | None:
        return result.get("checkpoint_path")  # Ray Train's, saved with the compared epoch

    def exploit(trial: Any, donor: Any, result: dict[str, Any], path: str) -> Any:
        epoch, own_id, donor_id = int(result["epoch"]), trial_id_of(trial), trial_id_of(donor)
        # Ray's path has no scheme on an object store: the donor's directory has.
        source = storage.join(run_dir_of(donor_id), posixpath.basename(str(path).rstrip("/")))
        target = storage.join(run_dir_of(own_id),
                              f"{EXPLOIT_PREFIX}epoch{epoch:04d}_from_{donor_id}")
        copy_checkpoint(source, target)
        pending.clear()
        pending.update(path=target, epoch=epoch, source=source, donor=donor_id,
                       before={k: get_dotted(trial.config["trial"]["config"], k) for k in keys})
        return Checkpoint(target)  # what Tune restores the trial from

    def new_config(trial: Any, explored: dict[str, Any]) -> dict[str, Any]:
        # Of Tune's (the donor's config, perturbed), the mutated keys only: the trial keeps
        # its own id and directory, and learns what it continues from.
        own = copy.deepcopy(trial.config)
        for key in keys:
            set_dotted(own["trial"]["config"], key, get_dotted(explored["trial"]["config"], key))
        own["trial"]["exploit"] = {"path": pending["path"], "epoch": pending["epoch"],
                                   "from": pending["donor"]}
        return own

    def after_exploit(trial: Any, donor: Any, score: float, donor_score: float) -> None:
        record = {
            "trial_id": trial_id_of(trial), "epoch": pending["epoch"],
            "from_trial": pending["donor"],
            "from_checkpoint": pending["source"], "copy": pending["path"],
            "before": pending["before"],
            "after": {k: get_dotted(trial.config["trial"]["config"], k) for k in keys},
            cfg.tracker.monitor: score, f"from_{cfg.tracker.monitor}": donor_score,
        }
        exploits.append(record)
        storage.write_json(storage.join(experiment_dir, PBT_FILE),
                           {"scheduler": "pbt", "exploits": exploits})
        on_exploit(record)

    hooks = PBTHooks(checkpoint_of, exploit, new_config, after_exploit, seeded,
                     last_epoch=cfg.train.epochs, max_running=cfg.tune.max_concurrent_trials,
                     interval=cfg.tune.perturbation_interval)
    return pbt_scheduler(
        hooks, time_attr="epoch", metric=cfg.tracker.monitor, mode=cfg.tracker.resolved_mode,
        perturbation_interval=cfg.tune.perturbation_interval,
        hyperparam_mutations=mutations(cfg), synch=True, quantile_fraction=0.25,
        resample_probability=0.25, require_attrs=True, log_config=False)
