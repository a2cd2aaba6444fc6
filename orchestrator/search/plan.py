"""Planning a search, no Ray and no training: each trial's config (validated before any
trial starts), whether the trials fit the cluster, which are still to run, what a resume may
change, and the leaderboard of finished trials with the overall best model exported."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from orchestrator import storage
from orchestrator.errors import UserError
from orchestrator.search.pbt import check_pbt
from orchestrator.search.space import (
    SearchSpaceError,
    Trial,
    boundary_values,
    check_search,
    make_trials,
    parse_space,
    sample_trials,
    set_dotted,
)
from orchestrator.start.cluster import Capacity, check_resources
from workers.checkpoint.integrity import FILES_KEY
from workers.contract.config import RunConfig
from workers.contract.names import (
    BEST_DIR,
    DONE_FILE,
    METADATA_FILE,
    MODEL_FILE,
    SEARCH_FILE,
    STATE_FILE,
    SUMMARY_FILE,
    TRIALS_DIR,
)
from workers.contract.workload import WorkloadError, check_params


def trial_config(base: dict[str, Any], trial: Trial, experiment_dir: str) -> RunConfig:
    from pydantic import ValidationError

    from orchestrator.start.config_file import format_validation_error

    data = copy.deepcopy(base)
    for key, value in trial.overrides.items():
        set_dotted(data, key, value)
    data["name"] = trial.trial_id
    data["storage_path"] = storage.join(experiment_dir, TRIALS_DIR)
    # Trials log to the experiment's W&B project, grouped under its name.
    data["wandb"]["project"] = base["wandb"]["project"] or base["name"]
    try:
        cfg = RunConfig.model_validate(data)
        check_params(cfg.workload.entrypoint, cfg.workload.params)
    except ValidationError as exc:
        raise SearchSpaceError(_which(trial, format_validation_error(exc))) from None
    except WorkloadError as exc:
        raise SearchSpaceError(_which(trial, str(exc))) from None
    return cfg


def _which(trial: Trial, problem: str) -> str:
    keys = ", ".join(f"{k}={v!r}" for k, v in trial.overrides.items())
    return f"tune.search_space: the value(s) {keys} give an invalid config: {problem}"


def search_seed(cfg: RunConfig) -> int:
    return cfg.tune.seed if cfg.tune.seed is not None else cfg.seed


def plan_search(cfg: RunConfig, experiment_dir: str) -> list[Trial]:
    """Draw the trials and validate every one of them; nothing runs before this passes. An
    adaptive search (optuna) draws none: its options and bounds are validated, each alone."""
    base = cfg.to_dict()
    try:
        params = parse_space(cfg.tune.search_space)
        check_search(params, cfg.tune.search)
        check_pbt(cfg)
        for param in params:  # each option / bound alone first, for a precise message
            for value in boundary_values(param):
                trial_config(base, Trial("check", {param.key: value}), experiment_dir)
        if cfg.tune.search == "optuna":
            return []
        trials = make_trials(sample_trials(params, cfg.tune.num_samples, search_seed(cfg),
                                           cfg.tune.search))
        for trial in trials:
            trial_config(base, trial, experiment_dir)
    except SearchSpaceError as exc:
        raise UserError(str(exc)) from None
    return trials


def boundary_configs(cfg: RunConfig, experiment_dir: str) -> dict[str, RunConfig]:
    """An adaptive search's stand-ins for its trials before any is proposed: the base config
    and each option or bound alone (what ``check_fit`` checks against the cluster)."""
    base = cfg.to_dict()
    configs = {"base": trial_config(base, Trial("base", {}), experiment_dir)}
    for param in parse_space(cfg.tune.search_space):
        for value in boundary_values(param):
            configs[f"{param.key}={value!r}"] = trial_config(
                base, Trial("check", {param.key: value}), experiment_dir)
    return configs


def trial_status(summary: Mapping[str, Any]) -> str:
    """A trial's summary (``records.Summary``), in a word."""
    if summary.get("errored"):
        return "error"
    if summary.get("interrupted"):
        return "interrupted"
    return "stopped early" if summary.get("stopped_early") else "completed"


def best_model_value(summary: dict[str, Any], monitor: str) -> float | None:
    """The monitored value of a trial's best model: its best evaluation's, or, where
    ``checkpoint.average_top_k``'s average won and became its best model, the average's."""
    averaged = summary.get("averaged") or {}
    if averaged.get("won"):
        return float(averaged["value"])
    value = (summary.get("best_metrics") or {}).get(monitor)
    return None if value is None else float(value)


def leaderboard(summaries: list[dict[str, Any]], monitor: str, mode: str) -> list[dict[str, Any]]:
    """Trials sorted by their best model's monitored value (trials without one last): row 0's
    is the model exported (``best_checkpoint``, the average where it won)."""
    def key(s: dict[str, Any]) -> tuple[int, float]:
        value = best_model_value(s, monitor)
        if value is None or not math.isfinite(value):
            return (1, 0.0)
        return (0, value if mode == "min" else -value)

    rows = []
    for rank, s in enumerate(sorted(summaries, key=key), start=1):
        best = s.get("best_metrics") or {}
        rows.append({
            "rank": rank,
            "trial_id": s["trial_id"],
            "hyperparameters": s["hyperparameters"],
            "status": trial_status(s),
            "best_epoch": s.get("best_epoch"),
            "epochs_completed": s.get("epochs_completed"),
            f"best_{monitor}": best_model_value(s, monitor),
            # The best model is checkpoint.average_top_k's average (best_metrics: the single
            # best evaluation's, which it beat).
            "best_is_average": bool((s.get("averaged") or {}).get("won")),
            "best_metrics": best,
            "test_metrics": s.get("test_metrics"),
            "best_checkpoint": s.get("best_checkpoint"),
            "wandb": s.get("wandb"),
        })
    return rows


def check_fit(cfg: RunConfig, configs: dict[str, RunConfig], resources: Capacity) -> bool:
    """Every trial must fit the cluster (a search may vary its scaling); whether GPUs are used."""
    use_gpu = check_resources(cfg, resources)
    for trial_id, trial in configs.items():
        try:
            check_resources(trial, resources)
        except UserError as exc:
            raise UserError(f"{exc} (trial {trial_id} of tune.search_space)") from None
    return use_gpu


# What a resumed search may change: how it runs, never what any trial computes. The name and
# storage_path are how the search was found.
RESUMABLE_KEYS = ("tune.max_concurrent_trials", "tune.one_worker_trials",
                  "failure.max_failures", "wandb.mode",
                  "wandb.project", "wandb.entity", "wandb.log_model", "wandb.keep")
IDENTITY_KEYS = ("name", "storage_path")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict) or (prefix and not data):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def resumed_config(saved: dict[str, Any], cfg: RunConfig) -> RunConfig:
    """The config a search was started with (from its search.json), with only the
    ``RESUMABLE_KEYS`` taken from ``cfg``; any other difference is refused (exit 2)."""
    current = cfg.to_dict()
    before, now = _flatten(saved), _flatten(current)
    if now.get("tracker.mode") == "auto":  # the search pinned what auto resolved to then
        now["tracker.mode"] = before.get("tracker.mode", "auto")
    if "tracker.also_monitor" in now:  # and each also-monitor's
        now["tracker.also_monitor"] = pinned_also_modes(before.get("tracker.also_monitor"),
                                                        now["tracker.also_monitor"])
    changed = sorted(k for k in before.keys() | now.keys()
                     if before.get(k, "<unset>") != now.get(k, "<unset>")
                     and not _under(k, RESUMABLE_KEYS + IDENTITY_KEYS))
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5
                                          else "")
        raise UserError(
            f"--resume: {shown} differ from the search being resumed (its config is in "
            f"{SEARCH_FILE}); undo the change, or start a new search with another name or "
            f"--overwrite (a resume may change only {', '.join(RESUMABLE_KEYS)})")
    merged = copy.deepcopy(saved)
    for key in (*RESUMABLE_KEYS, *IDENTITY_KEYS):
        if key in now:
            set_dotted(merged, key, now[key])
    return RunConfig.model_validate(merged)


def pinned_also_modes(before: Any, now: Any) -> Any:
    """Today's ``tracker.also_monitor``, each ``auto`` given the mode the search pinned for
    the same monitor when it started (``runner.pin_direction``); a list that differs
    otherwise stays as it is, for ``resumed_config`` to refuse."""
    if not isinstance(before, list) or not isinstance(now, list) or len(before) != len(now):
        return now
    return [{**n, "mode": b["mode"]} if n.get("mode") == "auto"
            and n.get("monitor") == b.get("monitor") else n
            for b, n in zip(before, now, strict=True)]


def export_best(board: list[dict[str, Any]], experiment_dir: str) -> str | None:
    """Copy the overall best model next to the leaderboard, with who it is in its metadata.

    The overall best is row 0, always (as W&B's ``best`` alias and ``best_trial``): when its
    best epoch has no model (a policy that did not save it), nothing is exported."""
    top = board[0] if board else None
    if top is None or not top["best_checkpoint"]:
        return None
    target = storage.join(experiment_dir, BEST_DIR)
    source = top["best_checkpoint"]
    metadata = storage.read_json(storage.join(source, METADATA_FILE))
    metadata.update({"trial_id": top["trial_id"], "hyperparameters": top["hyperparameters"],
                     "source_checkpoint": source})
    # The model's files, not the training state (which stays in the trial's checkpoint): the
    # metadata lists what is here, so `orchestrator best` checks the copy it names.
    files = {name: digest for name, digest in metadata.get(FILES_KEY, {}).items()
             if name != STATE_FILE} or None
    for name in files or (MODEL_FILE,):
        storage.write_bytes(storage.join(target, name),
                            storage.read_bytes(storage.join(source, name)))
    if files is not None:
        metadata[FILES_KEY] = files
    storage.write_json(storage.join(target, METADATA_FILE), metadata)
    return target


def trial_summary_path(cfg: RunConfig) -> str:
    return storage.join(storage.run_dir(cfg), SUMMARY_FILE)


def pending_trials(trials: list[Trial], configs: dict[str, RunConfig]) -> list[Trial]:
    """Trials that did not end (never started or interrupted), or ended in an error."""
    pending = []
    for trial in trials:
        cfg = configs[trial.trial_id]
        done = storage.join(storage.run_dir(cfg), DONE_FILE)
        if not storage.exists(done) or storage.read_json(done)["errored"]:
            pending.append(trial)
    return pending


def read_search(experiment_dir: str) -> dict[str, Any] | None:
    """search.json: the trials drawn when the search started, and its config."""
    path = storage.join(experiment_dir, SEARCH_FILE)
    return storage.read_json(path) if storage.exists(path) else None
