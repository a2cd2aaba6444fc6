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

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator import storage
from orchestrator.errors import TrainingError, UserError, user_error_among, user_error_in
from orchestrator.results.card import search_card_text
from orchestrator.results.checkpoints import resume_point
from orchestrator.results.epochs import epoch_record, progress_line
from orchestrator.results.history import read_history
from orchestrator.results.summary import (
    best_of,
    finalize_run,
    remove_unregistered_checkpoints,
    repair_history_file,
)
from orchestrator.search.pbt import (
    earlier_exploits,
    exploit_line,
    make_pbt,
    pbt_config,
    resumed_trial,
)
from orchestrator.search.plan import (
    boundary_configs,
    check_fit,
    export_best,
    leaderboard,
    pending_trials,
    plan_search,
    read_search,
    resumed_config,
    search_seed,
    trial_config,
    trial_status,
    trial_summary_path,
)
from orchestrator.search.space import PARAMS_KEY, Trial, parse_space
from orchestrator.start.cluster import Capacity, resolve_use_gpu
from orchestrator.start.console import Console, QuietConsole
from orchestrator.start.context import (
    Prepared,
    RunContext,
    StartMode,
    preflight,
    prepare,
    start_line,
)
from orchestrator.start.interrupts import Interrupted, SignalGuard
from orchestrator.start.run_dir import unlock
from orchestrator.tracking.staging import staged_path
from orchestrator.tracking.wandb_run import open_run
from orchestrator.training.datasets import also_modes, find_ray_datasets
from orchestrator.training.one_process import train_in_trial, trains_in_trial
from orchestrator.training.ray_trainer import build_trainer
from workers.compat import (
    keep_credentials_out_of_trial_runtime_envs,
    quiet_unhandled_task_errors,
    trial_error,
    tune_error_logs_filtered,
    tune_output_silenced,
    wait_for_tune_to_take_the_last_report,
)
from workers.contract.config import RunConfig
from workers.contract.direction import Direction, Mode
from workers.contract.direction import resolve as resolve_direction
from workers.contract.names import (
    CARD_FILE,
    DONE_FILE,
    LEADERBOARD_FILE,
    MODE_SOURCE_KEY,
    PBT_KEY,
    PROVENANCE_KEY,
    SEARCH_FILE,
    SEARCHER_FILE,
    SUMMARY_FILE,
    TUNE_DIR,
)
from workers.contract.user_errors import UserInputError
from workers.loop.provenance import code_fingerprint, package_versions

PBT_PAUSE_WAIT_S = 600  # a PBT trial at the end of a leg waits this long to be paused


@dataclass(frozen=True)
class SearchPlan:
    """A search's trials (every one, in order), each trial's config, and whether it uses GPUs."""

    trials: list[Trial]
    configs: dict[str, RunConfig]
    gpus: dict[str, bool]
    # Every trial trains in its Tune trial's own process (``training.one_process``); else
    # every trial is a Ray Train run.
    in_trial: bool = False


def run_trial(tune_config: dict[str, Any]) -> None:
    """The Tune trainable: one full data-parallel run (its own tracker, its own checkpoints);
    under PBT, one leg of it at a time (``search.pbt``). A one-worker trial trains in this
    process (``training.one_process``); any other is a Ray Train run of its own."""
    trial = tune_config["trial"]
    if PARAMS_KEY in tune_config:  # proposed by an adaptive searcher, named by TrialNamer
        from ray import tune

        cfg = trial_config(trial["base"], Trial(tune.get_context().get_trial_name(),
                                                tune_config[PARAMS_KEY]),
                           trial["experiment_dir"])
        use_gpu = resolve_use_gpu(cfg, Capacity(trial["capacity"], ()))
    else:
        cfg = RunConfig.model_validate(trial["config"])
        # Decided by the driver, which checked the whole cluster's capacity before the search.
        use_gpu = trial["use_gpu"]
    pbt = trial.get("pbt")
    extra = {PBT_KEY: {**pbt, "trial_id": trial["trial_id"],
                       "exploit": trial.get("exploit")}} if pbt else {}
    extra[MODE_SOURCE_KEY] = trial.get("mode_source")
    extra[PROVENANCE_KEY] = trial.get("provenance")
    if trial.get("in_trial"):
        from ray import tune

        train_in_trial(cfg, storage.run_dir(cfg), {**cfg.to_dict(), **extra},
                       log_model=trial["log_model"], on_report=tune.report)
    else:
        train_on_ray_train(cfg, use_gpu, trial["log_model"], extra)
    end_of_leg(trial, cfg, pbt)


def train_on_ray_train(cfg: RunConfig, use_gpu: bool, log_model: str,
                       extra: dict[str, Any]) -> None:
    """The trial as a Ray Train run of its own, its reports handed to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = build_trainer(cfg, storage.run_dir(cfg), use_gpu,
                            log_model=log_model,
                            callbacks=[TuneReportCallback()], ray_datasets=find_ray_datasets(cfg),
                            loop_config=extra)
    from ray.train import TrainingFailedError

    try:
        trainer.fit()
    except TrainingFailedError as exc:
        message = user_error_in(exc)
        if message:  # the user's mistake, plainly: the driver stops the search on it
            raise UserInputError(message) from None
        raise
    wait_for_tune_to_take_the_last_report()


def end_of_leg(trial: dict[str, Any], cfg: RunConfig, pbt: dict[str, Any] | None) -> None:
    """A PBT trial whose leg ended waits to be paused (see below); any other returns."""
    if pbt is None:
        return
    history = read_history(storage.run_dir(cfg))
    epoch = history[-1]["epoch"] if history else None  # the last evaluation's, not a save's
    if epoch and epoch < cfg.train.epochs and epoch % pbt["interval"] == 0:
        # The end of a leg: PBT (synchronous) pauses every trial that reports this epoch as
        # soon as Tune takes the report, and this process ends then; returning would end the
        # trial for good. Never paused (a Tune that behaves otherwise): an error, not a hang.
        time.sleep(PBT_PAUSE_WAIT_S)
        raise RuntimeError(f"{trial['trial_id']} ended its leg at epoch {epoch} and Tune's PBT "
                           f"did not pause it in {PBT_PAUSE_WAIT_S} s")


def trial_id_of(trial: Any) -> str:
    """The project's id of a Tune trial: in its config (drawn up front) or its name
    (proposed, named by ``TrialNamer``)."""
    return trial.config["trial"].get("trial_id") or str(trial)


class TrialLogger:
    """Tune callback in the driver: each trial's epochs to the terminal, and its epochs and
    models to its own W&B run, live.

    Trials are summarised after ``tuner.fit`` returns (``finish_trials``), not inside Tune's
    event loop, where waiting for a CPU to evaluate a test split could stall the search.
    """

    def __init__(self, configs: dict[str, RunConfig], trials: dict[str, Trial],
                 experiment: str, console: Console, experiment_dir: str = "") -> None:
        from ray.tune import Callback

        logger = self

        class _Callback(Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                if PARAMS_KEY in trial.config:  # proposed just now: recorded before it runs
                    logger.proposed(str(trial), trial.config[PARAMS_KEY])

            def on_trial_result(self, iteration, trials, trial, result, **info):
                logger.on_result(trial_id_of(trial), result)

            def on_trial_complete(self, iteration, trials, trial, **info):
                if not logger.stopping():  # stopped by a signal: it resumes
                    logger.mark_done(trial_id_of(trial), errored=False)

            def on_trial_error(self, iteration, trials, trial, **info):
                logger.found(trial_error(trial))
                if not logger.stopping():
                    logger.mark_done(trial_id_of(trial), errored=True)

        self.callback = _Callback()
        self.configs = configs
        self.trials = trials
        self.experiment = experiment
        self.experiment_dir = experiment_dir
        self.console = console
        self.runs: dict[str, Any] = {}
        self.errors: dict[str, list[str]] = {}
        self.mode_source = "set by tracker.mode"  # the search's (``check_monitor_first``)
        self.provenance: dict[str, Any] | None = None  # the search's, each trial's too
        self.stopping: Callable[[], bool] = lambda: False
        # A trial's user error (the workload's mistake): the search stops on it.
        self.user_error: str | None = None
        self.trained = False  # a trial reported an epoch: the workload works
        self.on_trained: Callable[[], None] = lambda: None
        # An adaptive search's: a proposed trial's config, and its record written at once.
        self.register: Callable[[str, dict[str, Any]], None] = lambda trial_id, overrides: None
        self.study: Any = None  # an adaptive search's Optuna study: searcher.json
        self.in_trial = False  # the trials train in their own processes (``SearchPlan``)

    def run_dir(self, trial_id: str) -> str:
        return storage.run_dir(self.configs[trial_id])

    def proposed(self, trial_id: str, overrides: dict[str, Any]) -> None:
        if trial_id not in self.trials:
            self.register(trial_id, overrides)

    def best_value(self, trial_id: str | None) -> float | None:
        """The trial's best monitored value so far (its tracker's, from its history: also the
        improvements made before a restart), None before any."""
        if trial_id is None or trial_id not in self.configs:
            return None
        best, _ = best_of(read_history(self.run_dir(trial_id)), [])
        if best is None:
            return None
        metrics: Mapping[str, Any] = best  # the monitor is one of the record's open keys
        return float(metrics[self.configs[trial_id].tracker.monitor])

    def found(self, error: BaseException | None) -> None:
        """A trial failed with ``error``: the user's mistake stops the search (``SignalStop``);
        the trials stopped with it may fail the same way, unheard."""
        message = user_error_among([error]) if error is not None else None
        if message and self.user_error is None:
            self.user_error = message
            quiet_unhandled_task_errors()

    def mark_done(self, trial_id: str, *, errored: bool) -> None:
        """Recorded at once (a small file), so that even if this driver is killed before it
        summarises the trial, a resumed search knows not to train it again."""
        storage.write_json(storage.join(self.run_dir(trial_id), DONE_FILE), {"errored": errored})
        self.write_searcher()
        self.console.advance()

    def write_searcher(self) -> None:
        if self.study is not None:
            from orchestrator.search.adaptive import study_records

            storage.write_json(storage.join(self.experiment_dir, SEARCHER_FILE),
                               {"searcher": "optuna", "trials": study_records(self.study)})

    def wandb_run(self, trial_id: str) -> Any:
        if trial_id not in self.runs:
            self.runs[trial_id] = open_run(
                self.configs[trial_id], self.run_dir(trial_id), group=self.experiment,
                job_type="trial", label=f"{self.experiment}-{trial_id}",
                extra={"trial_id": trial_id,
                       "hyperparameters": self.trials[trial_id].overrides},
                provenance=self.provenance,
            )
        return self.runs[trial_id]

    def on_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if "epoch" not in result:
            return
        if not self.trained:
            self.trained = True
            self.on_trained()
        record = epoch_record(result, result.get("checkpoint_path"))
        cfg = self.configs[trial_id]
        self.console.say(f"[{trial_id}] "
                         + progress_line(record, cfg.train.epochs, cfg.tracker.monitor))
        # The trial's recorder set the model aside for W&B, if it is one to log.
        staged = staged_path(self.run_dir(trial_id), record["checkpoint"])
        try:
            self.wandb_run(trial_id).handle(record, staged)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - W&B must not stop the search
            self.errors.setdefault(trial_id, []).append(f"{type(exc).__name__}: {exc}")

    def finish_trials(self, use_gpu: bool) -> None:
        """Summarise every ended trial not summarised yet (also those of an earlier, killed
        driver): summary.json, test split, plot, and W&B caught up from the run's history."""
        for trial_id in sorted(self.configs):
            run_dir = self.run_dir(trial_id)
            done = storage.join(run_dir, DONE_FILE)
            if not storage.exists(done) or storage.exists(storage.join(run_dir, SUMMARY_FILE)):
                continue
            trial = RunContext(cfg=self.configs[trial_id], run_dir=run_dir,
                               start=StartMode.TRIAL, console=QuietConsole(),
                               tracking=self.wandb_run(trial_id), use_gpu=use_gpu,
                               mode_source=self.mode_source, provenance=self.provenance)
            summary = finalize_run(
                trial, wandb_errors=self.errors.get(trial_id),
                extra={"trial_id": trial_id, "hyperparameters": self.trials[trial_id].overrides,
                       "errored": storage.read_json(done)["errored"],
                       "trained_in": "in_trial" if self.in_trial else "ray_train"},
            )
            self.runs.pop(trial_id)
            value = (summary["best_metrics"] or {}).get(summary["monitor"])
            self.console.say(f"[{trial_id}] {trial_status(summary)}: best {summary['monitor']}="
                             f"{value} at epoch {summary['best_epoch']} of "
                             f"{summary['epochs_completed']}")

    def abort_unfinished(self) -> None:
        for run in self.runs.values():
            run.abort()
        self.runs.clear()


class SignalStop:
    """A Tune stopper that ends the whole search once ``guard`` received a signal (or
    ``also`` says so: a trial found the user's mistake): Tune stops every running trial, and
    ``tuner.fit`` returns with Ray still up. Tune saves its stoppers with its experiment
    state: pickled, it is one that never stops."""

    def __init__(self, guard: SignalGuard | None,
                 also: Callable[[], bool] | None = None) -> None:
        self.guard = guard
        self.also = also

    def __getstate__(self) -> dict[str, Any]:
        return {"guard": None, "also": None}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.stop_all()

    def stop_all(self) -> bool:
        return bool(self.guard and self.guard.received) or bool(self.also and self.also())


def make_scheduler(cfg: RunConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration", metric=cfg.tracker.monitor,
        mode=cfg.tracker.resolved_mode, max_t=cfg.train.epochs,
        grace_period=cfg.tune.grace_period, reduction_factor=cfg.tune.reduction_factor,
    )


def resumed_pbt(ctx: RunContext) -> bool:
    """A PBT search continued with --resume: Tune's PBT would start its comparisons afresh on
    trials that stand at different epochs (its synchronous schedule then waits for a
    comparison no trial reaches), so the search finishes its trials without it."""
    return ctx.cfg.tune.scheduler == "pbt" and ctx.start is StartMode.RESUME


def drawn_trials(ctx: RunContext, plan: SearchPlan, todo: list[Trial]) -> dict[str, Any]:
    """Tuner arguments of a search drawn up front: one grid point per trial still to run."""
    log_model = ctx.tracking.log_model_setting
    from ray import tune

    cfg = ctx.cfg
    entries: list[dict[str, Any]] = [
        {"trial_id": t.trial_id, "config": plan.configs[t.trial_id].to_dict(),
         "log_model": log_model, "use_gpu": plan.gpus[t.trial_id],
         "mode_source": ctx.mode_source, "provenance": ctx.provenance,
         "in_trial": plan.in_trial} for t in todo]
    if cfg.tune.scheduler == "pbt":  # a resumed trial goes on with its last exploit's values
        exploits = earlier_exploits(ctx.run_dir)
        # Resumed: Tune's population state is gone, so the trials finish without legs or
        # further exploits (``resumed_pbt``).
        pbt = {"interval": (cfg.train.epochs if resumed_pbt(ctx)
                            else cfg.tune.perturbation_interval),
               "weight_decay": "train.weight_decay" in cfg.tune.search_space}
        for entry in entries:
            entry["config"], exploit = resumed_trial(entry["config"], entry["trial_id"],
                                                     exploits)
            entry.update(pbt=pbt, exploit=exploit)
    return {
        "param_space": {"trial": tune.grid_search(entries)},
        "num_samples": 1,
        "trial_dirname_creator": lambda t: t.config["trial"]["trial_id"],
    }


def proposed_trials(ctx: RunContext, plan: SearchPlan, todo: list[Trial],
                    logger: TrialLogger) -> dict[str, Any]:
    """Tuner arguments of an adaptive search: Optuna's study rebuilt from the trials proposed
    so far (finished ones observed, unfinished ones enqueued again), and proposals for the
    rest of ``tune.num_samples``."""
    from orchestrator.search.adaptive import (
        BestValueOptunaSearch,
        Observation,
        TrialNamer,
        id_width,
        make_study,
    )

    cfg = ctx.cfg
    params = parse_space(cfg.tune.search_space)
    pending = {t.trial_id for t in todo}
    earlier = [Observation(t.overrides, "pending") if t.trial_id in pending else
               Observation(t.overrides, "complete", logger.best_value(t.trial_id))
               for t in plan.trials]
    study, optuna_storage = make_study(cfg, params, search_seed(cfg), earlier)
    assert ctx.capacity is not None  # the search's own context: preflight measured it
    logger.study = study
    namer = TrialNamer([(t.trial_id, t.overrides) for t in todo], len(plan.trials),
                       id_width(cfg.tune.num_samples))
    searcher = BestValueOptunaSearch(cfg, params, study, optuna_storage,
                                     best_value=lambda tune_id: logger.best_value(
                                         namer.names.get(tune_id)))
    return {
        "param_space": {"trial": {
            "base": cfg.to_dict(), "experiment_dir": ctx.run_dir,
            "log_model": ctx.tracking.log_model_setting, "capacity": ctx.capacity.total,
            "mode_source": ctx.mode_source, "provenance": ctx.provenance,
            "in_trial": plan.in_trial}},
        "num_samples": cfg.tune.num_samples - (len(plan.trials) - len(todo)),
        "search_alg": searcher,
        "trial_name_creator": namer,
        "trial_dirname_creator": str,
    }


def run_tuner(ctx: RunContext, plan: SearchPlan, todo: list[Trial], logger: TrialLogger) -> None:
    """The search, until it ends or a signal stops it (``Interrupted`` once its running
    trials were stopped: trials that ended stay done, the others resume)."""
    cfg, guard = ctx.cfg, ctx.guard
    assert guard is not None  # the search's own context holds it (a trial's has none)
    from ray import tune
    from ray.tune.stopper import Stopper

    class _Stop(SignalStop, Stopper):
        pass

    keep_credentials_out_of_trial_runtime_envs()
    args = (proposed_trials(ctx, plan, todo, logger) if cfg.tune.search == "optuna"
            else drawn_trials(ctx, plan, todo))
    if resumed_pbt(ctx):
        from ray.tune.schedulers import FIFOScheduler

        ctx.console.say("resumed PBT search: each unfinished trial continues with its last "
                        "exploit's values to its end; no further exploits (Tune's population "
                        "state is not restored)")
        scheduler = FIFOScheduler()
    elif cfg.tune.scheduler == "pbt":
        scheduler = make_pbt(cfg, lambda trial_id: storage.run_dir(plan.configs[trial_id]),
                             trial_id_of, ctx.run_dir, search_seed(cfg),
                             on_exploit=lambda e: ctx.console.say(exploit_line(e)))
    else:
        scheduler = make_scheduler(cfg)
    tuner = tune.Tuner(
        tune.with_resources(run_trial, trial_resources(cfg, plan.in_trial)),
        param_space=args.pop("param_space"),
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            # PBT's scheduler holds trials back itself (compat.pbt_scheduler says why).
            max_concurrent_trials=(None if cfg.tune.scheduler == "pbt" and not resumed_pbt(ctx)
                                   else cfg.tune.max_concurrent_trials),
            reuse_actors=reuse_trial_processes(cfg, plan.in_trial), **args,
        ),
        run_config=tune.RunConfig(
            name=f"attempt-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage.join(ctx.run_dir, TUNE_DIR),
            callbacks=[logger.callback], verbose=0,
            stop=_Stop(guard, lambda: logger.user_error is not None),
        ),
    )

    def told_otherwise(record: logging.LogRecord) -> bool:
        """Tune's log of a trial's user error (a traceback), and its list of the trials that
        did not complete once the search stops on one: the search says it in one line."""
        error = record.exc_info[1] if record.exc_info else None
        return (error is not None and user_error_among([error]) is not None) or (
            logger.user_error is not None and record.levelno >= logging.ERROR)

    try:
        with tune_error_logs_filtered(told_otherwise), tune_output_silenced():
            guard.run(tuner.fit)
    except Interrupted:
        guard.wait_for_fit(timeout=120)  # Tune stops the running trials (SignalStop)
        raise


def reuse_trial_processes(cfg: RunConfig, in_trial: bool) -> bool:
    """Whether Tune may start a trial in the process of one that ended (saving the process's
    start and imports): where trials train in their own processes, and PBT does not pause
    them. A Ray Train trial's process must go: it owns its trainer's controller, and with it
    the workers' CPUs; a reused process would keep them and starve the next trial."""
    return in_trial and cfg.tune.scheduler != "pbt"


def trial_resources(cfg: RunConfig, in_trial: bool) -> dict[str, float]:
    """A trial that trains in its own process takes its worker's CPUs. One that only drives
    its Ray Train run takes no CPU (the CPUs go to the Train workers), and 1 MiB of memory,
    since Ray refuses a placement group bundle that asks for nothing."""
    if in_trial:
        return {"cpu": cfg.scaling.cpus_per_worker}
    return {"cpu": 0, "memory": 1 << 20}


def write_leaderboard(ctx: RunContext, plan: SearchPlan) -> list[dict[str, Any]]:
    """leaderboard.json from every trial's summary (a trial without one did not finish), the
    overall best model exported, and the search's W&B run finished with both."""
    cfg, experiment_dir = ctx.cfg, ctx.run_dir
    summaries = []
    for trial in plan.trials:
        path = trial_summary_path(plan.configs[trial.trial_id])
        summaries.append(storage.read_json(path) if storage.exists(path) else {
            "trial_id": trial.trial_id, "hyperparameters": trial.overrides, "interrupted": True,
        })
    mode = cfg.tracker.resolved_mode
    board = leaderboard(summaries, cfg.tracker.monitor, mode)
    best_dir = export_best(board, experiment_dir)
    record: dict[str, Any] = {
        "name": cfg.name, "experiment_dir": experiment_dir, "monitor": cfg.tracker.monitor,
        "mode": mode, "best_model": best_dir, "trials": board}
    card = storage.join(experiment_dir, CARD_FILE)  # the exported best's, with the top rows
    storage.write_bytes(card, search_card_text(record, experiment_dir).encode())
    record["wandb"] = ctx.tracking.finish_search(board, best_dir, card_path=card)
    storage.write_json(storage.join(experiment_dir, LEADERBOARD_FILE), record)
    return board


@dataclass(frozen=True)
class SearchDirections:
    """Which way each monitor of a search improves, resolved once before any trial starts,
    as a run resolves its own (``training.datasets``)."""

    primary: Direction
    also: tuple[Mode, ...] = ()  # tracker.also_monitor's modes, in their order


def check_monitor_first(cfg: RunConfig) -> tuple[SearchDirections, bool, dict[str, Any] | None]:
    """A monitor that no trial would report is refused before any trial starts (one line,
    exit 2): the workload is built once on a Ray worker, where the trials' workers run, and
    its reported names are compared with ``tracker.monitor``. The monitor's direction, and
    each ``tracker.also_monitor``'s, is resolved from what its metric declares there
    (``contract.direction``). Any other failure to build it is left for the trials to report.
    Also returned: whether the workload has Ray Dataset splits (True when it could not be
    built: its trials then stay Ray Train runs), and its data's fingerprint (None then)."""
    import ray
    from ray.exceptions import RayTaskError

    from workers.loop.probe import search_facts

    task = ray.remote(num_cpus=cfg.scaling.cpus_per_worker, max_retries=0)(search_facts)
    declared: dict[str, Any] = {}
    ray_datasets, data = True, None
    try:
        declared, ray_datasets, data = ray.get(task.remote(cfg.to_dict()))
    except RayTaskError as exc:
        message = user_error_among([exc])
        if message:
            raise UserError(message) from None
    return resolve_directions(cfg, declared), ray_datasets, data


def resolve_directions(cfg: RunConfig, declared: Mapping[str, tuple[bool, str]]
                       ) -> SearchDirections:
    """``tracker.mode`` and each ``tracker.also_monitor``'s mode from ``declared`` (the probe's
    reported name -> (higher is better, the object that says so)), by the run's own rules."""
    try:
        primary = resolve_direction(cfg.tracker.monitor, cfg.tracker.mode, declared)
    except UserInputError as exc:
        raise UserError(str(exc)) from None
    return SearchDirections(primary, also_modes(cfg, declared))


def pin_direction(directions: SearchDirections, *configs: RunConfig) -> None:
    """Every config of the search minimises or maximises as ``directions`` says, each
    also-monitor too: the trials' trackers, the schedulers, Optuna and the leaderboard all
    take it from there (and a trial proposed later, from the search's own config)."""
    for cfg in configs:
        cfg.tracker.mode = directions.primary.mode
        for also, mode in zip(cfg.tracker.also_monitor, directions.also, strict=True):
            also.mode = mode


def run_search(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
               console: Console | None = None,
               prepared: Prepared | None = None) -> list[dict[str, Any]]:
    """The whole search, to its leaderboard. ``prepared``: the search directory's fate, when
    the caller decided it already."""
    console = console or Console()
    prepared = prepared or prepare(cfg, resume=resume, overwrite=overwrite, kind="search")
    experiment_dir = prepared.run_dir
    if prepared.nothing_to_resume:
        console.say(start_line(prepared, "search"))
    cfg = pbt_config(cfg)  # as saved in search.json: a resume compares with it
    saved = read_search(experiment_dir) if prepared.start is StartMode.RESUME else None
    if saved is not None:  # the search that was started, not today's config
        cfg = resumed_config(saved["config"], cfg)
        trials = [Trial(t["trial_id"], t["overrides"]) for t in saved["trials"]]
    else:
        trials = plan_search(cfg, experiment_dir)  # every trial validated before any starts
    base = cfg.to_dict()
    configs = {t.trial_id: trial_config(base, t, experiment_dir) for t in trials}
    # An adaptive search's trials are proposed as it goes: the options and bounds stand in.
    checked = configs if cfg.tune.search != "optuna" else boundary_configs(cfg, experiment_dir)
    directions: list[Direction] = []
    ray_datasets: list[bool] = []
    gpus_used: list[bool] = []
    provenance: dict[str, Any] = {}

    def fits(capacity: Capacity) -> bool:
        gpus_used.append(check_fit(cfg, checked, capacity))
        return gpus_used[-1]

    def check_on_ray() -> None:
        resolved, streamed, data = check_monitor_first(next(iter(checked.values())))
        directions.append(resolved.primary)
        ray_datasets.append(streamed)
        pin_direction(resolved, cfg, *configs.values(), *checked.values())
        # Once for the search: every trial's summary, metadata and W&B run carry it.
        provenance.update(code=code_fingerprint(cfg.workload.entrypoint),
                          packages=package_versions(gpus_used[-1]), data=data)

    with SignalGuard() as guard:
        ctx = preflight(  # the W&B run fails here, not mid-search
            prepared.with_config(cfg), kind="search", console=console, guard=guard,
            fits=fits,
            open_tracking=lambda: open_run(cfg, experiment_dir, job_type="search",
                                           provenance=provenance),
            check_on_ray=check_on_ray)
        ctx.mode_source = directions[0].source
        ctx.provenance = provenance
        console.say(f"every trial: {directions[0].describe(cfg.tracker.monitor)}")
        capacity = ctx.capacity
        assert capacity is not None  # preflight measured it
        gpus = {trial_id: resolve_use_gpu(c, capacity) for trial_id, c in configs.items()}
        in_trial = all(trains_in_trial(c, resolve_use_gpu(c, capacity), ray_datasets[0])
                       for c in checked.values())
        plan = SearchPlan(trials, configs, gpus, in_trial)
        try:
            return _search(ctx, plan)
        except SearchMistake:
            forget_failed_start(ctx)
            raise
        finally:
            let_go_of_replaced(ctx)  # the search ran (or stopped with its record)
            unlock(experiment_dir)


class SearchMistake(UserError):
    """A trial found the user's mistake before any trial trained: nothing of the search is
    worth keeping."""


def let_go_of_replaced(ctx: RunContext) -> None:
    """The search an ``--overwrite`` replaces goes for good once a trial trained (the
    workload works) or the search ended; until then it was aside (``run_dir.SetAside``)."""
    if ctx.replaced is not None:
        ctx.replaced.discard()
        ctx.replaced = None


def forget_failed_start(ctx: RunContext) -> None:
    """A search stopped on the user's mistake before any trial trained: what it wrote goes
    (a resumed search's directory stays), and the search it was to replace is back."""
    ctx.tracking.abort()
    if ctx.replaced is not None:
        ctx.replaced.restore()  # deletes what this search wrote, then puts the old one back
        ctx.replaced = None
    elif ctx.start is not StartMode.RESUME:
        storage.delete_dir(ctx.run_dir)


def write_search(ctx: RunContext, plan: SearchPlan) -> None:
    """search.json: the config and every trial drawn or proposed so far, in order."""
    storage.write_json(storage.join(ctx.run_dir, SEARCH_FILE),
                       {"trials": [t.to_dict() for t in plan.trials], "config": ctx.cfg.to_dict()})


def register(ctx: RunContext, plan: SearchPlan, logger: TrialLogger, trial: Trial) -> None:
    """A trial the searcher proposed: its config, and search.json rewritten before it runs
    (so a resume knows it)."""
    cfg = trial_config(ctx.cfg.to_dict(), trial, ctx.run_dir)
    plan.trials.append(trial)
    plan.trials.sort(key=lambda t: t.trial_id)  # the order proposed (a later may start first)
    plan.configs[trial.trial_id] = cfg
    assert ctx.capacity is not None  # the search's own context: preflight measured it
    plan.gpus[trial.trial_id] = resolve_use_gpu(cfg, ctx.capacity)
    logger.trials[trial.trial_id] = trial
    write_search(ctx, plan)


def check_trial_resume_point(run_dir: str, trial_id: str, console: Console) -> None:
    """A trial that a resumed search continues does what a resumed run does
    (``training.driver.check_resume_point``): what a killed trial left in flight goes, and it
    continues from its newest intact checkpoint, each damaged newer one skipped and said so
    (a trial's own processes log it where nobody sees it); none intact: exit 2 before any
    trial starts. A trial that never saved has nothing to check."""
    if not storage.exists(run_dir):
        return
    remove_unregistered_checkpoints(run_dir)
    repair_history_file(run_dir)
    try:
        chosen, damaged = resume_point(run_dir)
    except UserError as exc:
        raise UserError(f"[{trial_id}] {exc}") from None
    for problem in damaged:
        console.say(f"[{trial_id}] warning: damaged checkpoint skipped: {problem}")
    if damaged:
        console.say(f"[{trial_id}] resuming from {chosen}, the newest intact checkpoint")


def _search(ctx: RunContext, plan: SearchPlan) -> list[dict[str, Any]]:
    """The search itself, once its directory and W&B run are ready: the leaderboard."""
    cfg, console, guard, trials = ctx.cfg, ctx.console, ctx.guard, plan.trials
    assert guard is not None  # the search's own context holds it (a trial's has none)
    adaptive = cfg.tune.search == "optuna"
    write_search(ctx, plan)

    todo = pending_trials(trials, plan.configs)
    finished = len(trials) - len(todo)
    total = cfg.tune.num_samples if adaptive else len(trials)
    console.say(f"Search {cfg.name!r}: {total} trials ({finished} already finished"
                + (", each proposed by optuna from the results so far" if adaptive else "")
                + f"), {cfg.tune.max_concurrent_trials} at a time, scheduler "
                f"{cfg.tune.scheduler}, in {ctx.run_dir}")
    logger = TrialLogger(plan.configs, {t.trial_id: t for t in trials}, cfg.name, console,
                         ctx.run_dir)
    logger.mode_source = ctx.mode_source
    logger.provenance = ctx.provenance
    logger.in_trial = plan.in_trial
    logger.register = lambda trial_id, overrides: register(ctx, plan, logger,
                                                           Trial(trial_id, overrides))
    for trial in todo:  # before anything of a resumed search's trials changes
        check_trial_resume_point(logger.run_dir(trial.trial_id), trial.trial_id, console)
    for trial in todo:  # an errored trial runs again: its old verdict goes
        for name in (DONE_FILE, SUMMARY_FILE):
            storage.delete_file(storage.join(logger.run_dir(trial.trial_id), name))
    interrupted = None
    # Trials that a signal or the user's mistake stopped are not done: a resume runs them.
    logger.stopping = lambda: bool(guard.received or logger.user_error)
    logger.on_trained = lambda: let_go_of_replaced(ctx)
    try:
        if todo or (adaptive and finished < total):
            with console.progress(total, f"{cfg.name} trials"):
                console.advance(completed=finished)
                run_tuner(ctx, plan, todo, logger)
    except Interrupted as exc:
        interrupted = exc
    finally:
        if not (logger.user_error and not logger.trained):  # else nothing of it stays
            logger.finish_trials(ctx.use_gpu)
        logger.abort_unfinished()
        logger.write_searcher()
    if logger.user_error and not logger.trained:
        raise SearchMistake(logger.user_error)
    board = write_leaderboard(ctx, plan)
    if logger.user_error:  # found by a later trial (its own values): the others stand
        raise UserError(f"{logger.user_error} (found by a trial after others had trained; "
                        "the search stopped: fix it, then continue it with --resume)")
    unfinished = [r["trial_id"] for r in board if r["status"] == "interrupted"]
    if interrupted:
        raise TrainingError(f"interrupted by {interrupted}: {len(board) - len(unfinished)} of "
                            f"{len(board)} trials done, {len(unfinished)} to run again",
                            exit_code=interrupted.exit_code)
    if unfinished:
        console.say(f"{len(unfinished)} trial(s) did not finish; continue with --resume")
    return board
