"""``orchestrator tune``: a Ray Tune search whose every trial is a full data-parallel run.

Layout under ``<storage_path>/<name>/``::

    search.json        the trials, drawn up front (ids and hyperparameters): resume reads it
    trials/<id>/       each trial's Ray Train run: checkpoints, history.json, summary.json
    leaderboard.json   trials sorted by their best monitored value
    best_model/        the overall best model (weights + metadata with trial id, hyperparams)
    _tune/             Ray Tune's own bookkeeping (never loaded back by this project)

Each trial is a function that fits a ``TorchTrainer`` with ``TuneReportCallback`` (the Ray
2.60 pattern); its rank 0 keeps its own tracker and checkpoints. W&B is logged from the
driver by a Tune callback, one run per trial grouped under the experiment, so a trial that
ASHA stops (its process is gone) is documented exactly like one that ran to the end.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

from orchestrator import storage
from orchestrator.cluster import (
    Capacity,
    attaches_to_cluster,
    check_resources,
    cluster_capacity,
    init_ray,
    local_resources,
    resolve_use_gpu,
)
from orchestrator.config import UserError
from orchestrator.recorder import STAGING_DIR
from orchestrator.search import (
    SearchSpaceError,
    Trial,
    boundary_values,
    make_trials,
    parse_space,
    sample_trials,
    set_dotted,
)
from orchestrator.summary import SUMMARY_FILE, finalize_run
from orchestrator.train import build_trainer, prepare_run_dir
from orchestrator.wandb_run import NullRun, open_run
from workers.checkpointing import METADATA_FILE, MODEL_FILE
from workers.config import RunConfig, resolve_mode
from workers.workload import WorkloadError, check_params

SEARCH_FILE = "search.json"
DONE_FILE = "trial_done.json"  # written the moment Tune reports a trial ended
LEADERBOARD_FILE = "leaderboard.json"
BEST_DIR = "best_model"


def trial_config(base: dict[str, Any], trial: Trial, experiment_dir: str) -> RunConfig:
    from pydantic import ValidationError

    from orchestrator.config import format_validation_error

    data = copy.deepcopy(base)
    for key, value in trial.overrides.items():
        set_dotted(data, key, value)
    data["name"] = trial.trial_id
    data["storage_path"] = storage.join(experiment_dir, "trials")
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


def plan_search(cfg: RunConfig, experiment_dir: str) -> list[Trial]:
    """Draw the trials and validate every one of them; nothing runs before this passes."""
    base = cfg.to_dict()
    try:
        params = parse_space(cfg.tune.search_space)
        for param in params:  # each option / bound alone first, for a precise message
            for value in boundary_values(param):
                trial_config(base, Trial("check", {param.key: value}), experiment_dir)
        seed = cfg.tune.seed if cfg.tune.seed is not None else cfg.seed
        trials = make_trials(sample_trials(params, cfg.tune.num_samples, seed))
        for trial in trials:
            trial_config(base, trial, experiment_dir)
    except SearchSpaceError as exc:
        raise UserError(str(exc)) from None
    return trials


def run_trial(tune_config: dict[str, Any]) -> None:
    """The Tune trainable: one full data-parallel run (its own tracker, its own checkpoints)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = RunConfig.model_validate(tune_config["trial"]["config"])
    run_dir = storage.join(storage.resolve(cfg.storage_path), cfg.name)
    # Decided by the driver, which checked the whole cluster's capacity before the search.
    use_gpu = tune_config["trial"]["use_gpu"]
    trainer = build_trainer(cfg, run_dir, use_gpu, callbacks=[TuneReportCallback()],
                            label=cfg.name, log_model=tune_config["trial"]["log_model"])
    trainer.fit()


def _record(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("epoch", "is_best", "epoch_seconds")
    return {k: v for k, v in result.items() if k in keep or k.startswith(("train_", "val_"))}


class TrialLogger:
    """Tune callback in the driver: each trial's epochs and models to its own W&B run, live.

    Trials are summarised after ``tuner.fit`` returns (``finish_trials``), not inside Tune's
    event loop, where waiting for a CPU to evaluate a test split could stall the search.
    """

    def __init__(self, configs: dict[str, RunConfig], trials: dict[str, Trial],
                 experiment: str) -> None:
        from ray.tune import Callback

        logger = self

        class _Callback(Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                logger.on_result(trial.config["trial"]["trial_id"], result)

            def on_trial_complete(self, iteration, trials, trial, **info):
                logger.mark_done(trial.config["trial"]["trial_id"], errored=False)

            def on_trial_error(self, iteration, trials, trial, **info):
                logger.mark_done(trial.config["trial"]["trial_id"], errored=True)

        self.callback = _Callback()
        self.configs = configs
        self.trials = trials
        self.experiment = experiment
        self.runs: dict[str, Any] = {}
        self.errors: dict[str, list[str]] = {}

    def run_dir(self, trial_id: str) -> str:
        cfg = self.configs[trial_id]
        return storage.join(storage.resolve(cfg.storage_path), cfg.name)

    def mark_done(self, trial_id: str, *, errored: bool) -> None:
        """Recorded at once (a small file), so that even if this driver is killed before it
        summarises the trial, a resumed search knows not to train it again."""
        storage.write_json(storage.join(self.run_dir(trial_id), DONE_FILE), {"errored": errored})

    def wandb_run(self, trial_id: str) -> Any:
        if trial_id not in self.runs:
            self.runs[trial_id] = open_run(
                self.configs[trial_id], self.run_dir(trial_id), group=self.experiment,
                job_type="trial", label=f"{self.experiment}-{trial_id}",
                extra={"trial_id": trial_id,
                       "hyperparameters": self.trials[trial_id].overrides},
            )
        return self.runs[trial_id]

    def on_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if "epoch" not in result:
            return
        staged = None
        if result.get("checkpoint_path"):  # the trial's recorder set the model aside for W&B
            name = result["checkpoint_path"].rstrip("/").rsplit("/", 1)[-1]
            staged = storage.join(self.run_dir(trial_id), STAGING_DIR, name)
            staged = staged if storage.exists(staged) else None
        try:
            self.wandb_run(trial_id).handle(_record(result), staged)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - W&B must not stop the search
            self.errors.setdefault(trial_id, []).append(f"{type(exc).__name__}: {exc}")

    def finish_trials(self, use_gpu: bool, say: Any) -> None:
        """Summarise every ended trial not summarised yet (also those of an earlier, killed
        driver): summary.json, test split, plot, and W&B caught up from the run's history."""
        for trial_id in sorted(self.configs):
            run_dir = self.run_dir(trial_id)
            done = storage.join(run_dir, DONE_FILE)
            if not storage.exists(done) or storage.exists(storage.join(run_dir, SUMMARY_FILE)):
                continue
            summary = finalize_run(
                self.configs[trial_id], run_dir, self.wandb_run(trial_id),
                use_gpu=use_gpu, start="tune", say=lambda *_: None,
                wandb_errors=self.errors.get(trial_id),
                extra={"trial_id": trial_id, "hyperparameters": self.trials[trial_id].overrides,
                       "errored": storage.read_json(done)["errored"]},
            )
            self.runs.pop(trial_id)
            value = (summary["best_metrics"] or {}).get(summary["monitor"])
            say(f"[{trial_id}] {trial_status(summary)}: best {summary['monitor']}={value} "
                f"at epoch {summary['best_epoch']} of {summary['epochs_completed']}")

    def abort_unfinished(self) -> None:
        for run in self.runs.values():
            run.abort()
        self.runs.clear()


def trial_status(summary: dict[str, Any]) -> str:
    if summary.get("errored"):
        return "error"
    if summary.get("interrupted"):
        return "interrupted"
    return "stopped early" if summary.get("stopped_early") else "completed"


def leaderboard(summaries: list[dict[str, Any]], monitor: str, mode: str) -> list[dict[str, Any]]:
    """Trials sorted by their best monitored value (trials without one last)."""
    def key(s: dict[str, Any]) -> tuple[int, float]:
        value = (s.get("best_metrics") or {}).get(monitor)
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
            f"best_{monitor}": best.get(monitor),
            "best_metrics": best,
            "test_metrics": s.get("test_metrics"),
            "best_checkpoint": s.get("best_checkpoint"),
            "wandb": s.get("wandb"),
        })
    return rows


def export_best(board: list[dict[str, Any]], experiment_dir: str) -> str | None:
    """Copy the overall best model next to the leaderboard, with who it is in its metadata."""
    top = next((row for row in board if row["best_checkpoint"]), None)
    if top is None:
        return None
    target = storage.join(experiment_dir, BEST_DIR)
    source = top["best_checkpoint"]
    metadata = storage.read_json(storage.join(source, METADATA_FILE))
    metadata.update({"trial_id": top["trial_id"], "hyperparameters": top["hyperparameters"],
                     "source_checkpoint": source})
    storage.write_bytes(storage.join(target, MODEL_FILE),
                        storage.read_bytes(storage.join(source, MODEL_FILE)))
    storage.write_json(storage.join(target, METADATA_FILE), metadata)
    return target


def trial_summary_path(cfg: RunConfig) -> str:
    return storage.join(storage.resolve(cfg.storage_path), cfg.name, SUMMARY_FILE)


def pending_trials(trials: list[Trial], configs: dict[str, RunConfig]) -> list[Trial]:
    """Trials that did not end (never started or interrupted), or ended in an error."""
    pending = []
    for trial in trials:
        cfg = configs[trial.trial_id]
        done = storage.join(storage.resolve(cfg.storage_path), cfg.name, DONE_FILE)
        if not storage.exists(done) or storage.read_json(done)["errored"]:
            pending.append(trial)
    return pending


def make_scheduler(cfg: RunConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration", metric=cfg.tracker.monitor,
        mode=resolve_mode(cfg.tracker.monitor, cfg.tracker.mode), max_t=cfg.train.epochs,
        grace_period=cfg.tune.grace_period, reduction_factor=cfg.tune.reduction_factor,
    )


def saved_trials(experiment_dir: str) -> list[Trial] | None:
    path = storage.join(experiment_dir, SEARCH_FILE)
    if not storage.exists(path):
        return None
    return [Trial(t["trial_id"], t["overrides"]) for t in storage.read_json(path)["trials"]]


def run_tuner(cfg: RunConfig, todo: list[Trial], configs: dict[str, RunConfig],
              logger: TrialLogger, experiment_dir: str, log_model: str | None,
              gpus: dict[str, bool]) -> None:
    from ray import tune

    tuner = tune.Tuner(
        # The trial process only drives its trainer: no CPU (the CPUs go to the Train workers),
        # and 1 MiB of memory, since Ray refuses a placement group bundle that asks for nothing.
        tune.with_resources(run_trial, {"cpu": 0, "memory": 1 << 20}),
        param_space={"trial": tune.grid_search(
            [{"trial_id": t.trial_id, "config": configs[t.trial_id].to_dict(),
              "log_model": log_model, "use_gpu": gpus[t.trial_id]} for t in todo]
        )},
        tune_config=tune.TuneConfig(
            num_samples=1, scheduler=make_scheduler(cfg),
            max_concurrent_trials=cfg.tune.max_concurrent_trials,
            trial_dirname_creator=lambda t: t.config["trial"]["trial_id"],
            # A stopped trial's process must go: it owns its trainer's controller, and with it
            # the workers' CPUs; a reused process would keep them and starve the next trial.
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=f"attempt-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage.join(experiment_dir, "_tune"),
            callbacks=[logger.callback], verbose=0,
        ),
    )
    tuner.fit()


def check_fit(cfg: RunConfig, configs: dict[str, RunConfig], resources: Capacity) -> bool:
    """Every trial must fit the cluster (a search may vary its scaling); whether GPUs are used."""
    use_gpu = check_resources(cfg, resources)
    for trial_id, trial in configs.items():
        try:
            check_resources(trial, resources)
        except UserError as exc:
            raise UserError(f"{exc} (trial {trial_id} of tune.search_space)") from None
    return use_gpu


def run_search(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
               say: Any = print) -> list[dict[str, Any]]:

    experiment_dir = storage.join(storage.resolve(cfg.storage_path), cfg.name)
    start = prepare_run_dir(experiment_dir, resume=resume, overwrite=overwrite)
    trials = (saved_trials(experiment_dir) if start == "resume" else None) \
        or plan_search(cfg, experiment_dir)  # every trial validated before anything starts
    base = cfg.to_dict()
    configs = {t.trial_id: trial_config(base, t, experiment_dir) for t in trials}
    if not attaches_to_cluster():
        check_fit(cfg, configs, local_resources())
    local = init_ray()
    cap = cluster_capacity(local)
    use_gpu = check_fit(cfg, configs, cap)
    gpus = {trial_id: resolve_use_gpu(c, cap) for trial_id, c in configs.items()}
    if start == "overwrite":
        storage.delete_dir(experiment_dir)
    storage.write_json(storage.join(experiment_dir, SEARCH_FILE),
                       {"trials": [t.to_dict() for t in trials], "config": cfg.to_dict()})
    search_run = open_run(cfg, experiment_dir, job_type="search")  # fails here, not mid-search

    todo = pending_trials(trials, configs)
    say(f"Search {cfg.name!r}: {len(trials)} trials ({len(trials) - len(todo)} already "
        f"finished), {cfg.tune.max_concurrent_trials} at a time, scheduler {cfg.tune.scheduler}, "
        f"in {experiment_dir}")
    logger = TrialLogger(configs, {t.trial_id: t for t in trials}, cfg.name)
    for trial in todo:  # an errored trial runs again: its old verdict goes
        for name in (DONE_FILE, SUMMARY_FILE):
            storage.delete_file(storage.join(logger.run_dir(trial.trial_id), name))
    try:
        if todo:
            log_model = None if isinstance(search_run, NullRun) else cfg.wandb.log_model
            run_tuner(cfg, todo, configs, logger, experiment_dir, log_model, gpus)
    finally:
        logger.finish_trials(use_gpu, say)
        logger.abort_unfinished()

    summaries = []
    for trial in trials:
        path = trial_summary_path(configs[trial.trial_id])
        summaries.append(storage.read_json(path) if storage.exists(path) else {
            "trial_id": trial.trial_id, "hyperparameters": trial.overrides, "interrupted": True,
        })
    mode = resolve_mode(cfg.tracker.monitor, cfg.tracker.mode)
    board = leaderboard(summaries, cfg.tracker.monitor, mode)
    best_dir = export_best(board, experiment_dir)
    storage.write_json(storage.join(experiment_dir, LEADERBOARD_FILE), {
        "name": cfg.name, "experiment_dir": experiment_dir, "monitor": cfg.tracker.monitor,
        "mode": mode, "best_model": best_dir, "trials": board,
        "wandb": finish_search_run(search_run, board, best_dir),
    })
    unfinished = [r["trial_id"] for r in board if r["status"] == "interrupted"]
    if unfinished:
        say(f"{len(unfinished)} trial(s) did not finish; continue with --resume")
    return board


def finish_search_run(run: Any, board: list[dict[str, Any]], best_dir: str | None) -> dict:
    """The experiment's own W&B run: the leaderboard and the overall best model, findable."""
    if isinstance(run, NullRun) or best_dir is None:
        return run.finish({"best_metrics": None, "history": []}, None)
    metadata = storage.read_json(storage.join(best_dir, METADATA_FILE))
    run.log_model(best_dir, metadata, name=f"{run.cfg.name}-best-model",
                  aliases=["best", board[0]["trial_id"]])
    return run.finish_search(board)
