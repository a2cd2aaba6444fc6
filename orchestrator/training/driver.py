"""``orchestrator train``: one data-parallel run on Ray Train, ending with summary.json."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator import storage
from orchestrator.errors import (
    TrainingError,
    UserError,
    failure_summary,
    one_line,
    user_error_in,
)
from orchestrator.results.checkpoints import resume_point
from orchestrator.results.epochs import nonfinite, progress_line
from orchestrator.results.history import read_history
from orchestrator.results.summary import (
    finalize_run,
    remove_unregistered_checkpoints,
    repair_history_file,
)
from orchestrator.start.cluster import check_data_room, check_resources
from orchestrator.start.console import Console
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
from orchestrator.start.watchdog import Watchdog, WorkersLost, needs
from orchestrator.training.datasets import WorkloadFacts, inspect_workload
from orchestrator.training.provenance import resume_changes
from orchestrator.training.ray_trainer import RAY_TRAIN, EventPump, RayTrain
from workers.contract.config import RunConfig
from workers.contract.names import (
    FAILURE_LOG,
    MODE_SOURCE_KEY,
    PROVENANCE_KEY,
    point,
    where,
)
from workers.contract.records import EpochRecord, Summary
from workers.loop.channel import Channel
from workers.loop.provenance import code_fingerprint, package_versions

if TYPE_CHECKING:
    from orchestrator.start.cluster import Capacity


def check_resume_point(prepared: Prepared, console: Console) -> None:
    """Nothing intact to resume from: exit 2 before anything starts; damaged checkpoints
    are skipped, and said so."""
    remove_unregistered_checkpoints(prepared.run_dir)  # what a killed run left in flight
    repair_history_file(prepared.run_dir)  # an epoch Ray registered but the recorder missed
    chosen, damaged = resume_point(prepared.run_dir)
    for problem in damaged:
        console.say(f"warning: damaged checkpoint skipped: {problem}")
    if damaged:
        console.say(f"resuming from {chosen}, the newest intact checkpoint")


def start_run(prepared: Prepared, console: Console, guard: SignalGuard) -> RunContext:
    """Everything checked and opened before training (``start.context.preflight``)."""
    from orchestrator.tracking.wandb_run import open_run

    cfg = prepared.cfg
    if prepared.start is StartMode.RESUME:
        check_resume_point(prepared, console)
    facts: list[WorkloadFacts] = []
    gpus: list[bool] = []
    provenance: dict[str, Any] = {}

    def fits(capacity: Capacity) -> bool:
        gpus.append(check_resources(cfg, capacity))
        return gpus[-1]

    def inspect() -> None:
        facts.append(inspect_workload(cfg))
        # Pinned before the config reaches the W&B run, the workers and the records: the one
        # direction every process and file of the run uses.
        cfg.tracker.mode = facts[0].direction.mode
        for also, mode in zip(cfg.tracker.also_monitor, facts[0].also_modes, strict=True):
            also.mode = mode
        provenance.update(code=code_fingerprint(cfg.workload.entrypoint),
                          packages=package_versions(gpus[-1]), data=facts[0].data)

    ctx = preflight(prepared, kind="run", console=console, guard=guard, fits=fits,
                    open_tracking=lambda: open_run(cfg, prepared.run_dir,
                                                   provenance=provenance),
                    check_on_ray=inspect)
    direction = facts[0].direction
    ctx.ray_datasets, ctx.mode_source = facts[0].ray_datasets, direction.source
    ctx.provenance = provenance
    if prepared.start is StartMode.RESUME:  # what changed since the run started: one line
        recorded = read_history(prepared.run_dir)
        ctx.provenance_changes = resume_changes(
            prepared.run_dir, provenance, recorded[-1]["epoch"] if recorded else 0, console.say)
    console.say(start_line(prepared))
    console.say(f"{cfg.scaling.describe_workers()} on "
                f"{'GPU (NCCL)' if ctx.use_gpu else 'CPU (gloo)'}, {cfg.train.epochs} epochs, "
                f"policy {cfg.checkpoint.policy}, {direction.describe(cfg.tracker.monitor)}, "
                f"W&B {ctx.tracking.mode}")
    return ctx


class EpochHandler:
    """What the driver does with each epoch's record (print it, log it to W&B), and with a
    worker's fault (say it, and at the next record that Ray restarted the workers).

    ``recorded_before``: where the history ended when this command started (a resume):
    what a stop leaves unshown is printed from the history (``show_the_rest``), once across
    a run's parts."""

    def __init__(self, ctx: RunContext, recorded_before: tuple[int, int] = (0, 0)) -> None:
        self.ctx = ctx
        self.at, self.failures, self.restarting = (0, 0), 0, False
        self.workers: int | None = None  # how many trained the last record
        self.recorded_before = recorded_before
        self.shown: set[tuple[int, int]] = set()  # the records printed, by (epoch, step)

    def failed(self, what: str) -> None:
        self.failures += 1
        retries = self.ctx.cfg.failure.max_failures
        if retries == -1 or self.failures <= retries:
            self.restarting = True
            self.ctx.console.say(
                f"a worker failed ({what}); restarting the workers from the latest checkpoint "
                f"(failure {self.failures} of {'unlimited' if retries == -1 else retries})")

    def __call__(self, record: EpochRecord, staged: str | None) -> None:
        cfg, console = self.ctx.cfg, self.ctx.console
        if point(record) <= self.at or self.restarting:  # Ray restarted the workers
            console.say(f"workers restarted: training again from "
                        f"{where(record, bool(cfg.train.eval_every_n_steps))} "
                        "(the latest checkpoint)")
            self.restarting = False
        workers = record.get("workers")
        if self.workers not in (None, workers):  # an elastic run resized
            console.say(f"the cluster changed: epoch {record['epoch']} trained on {workers} "
                        f"worker{'s' if workers != 1 else ''} (was {self.workers}), from "
                        "the latest checkpoint")
        self.at, self.workers = point(record), workers
        self.show(record)
        if record.get("stop_reason"):  # the tracker's, on rank 0 (patience, a threshold)
            console.say(f"stopping early: {record['stop_reason']}")
        bad = nonfinite(record)
        if bad and cfg.train.stop_on_nonfinite:
            console.say(f"epoch {record['epoch']}: {', '.join(bad)} not finite; the run stops "
                        "here (train.stop_on_nonfinite) and keeps its best so far")
        console.advance(completed=record["epoch"])
        self.ctx.tracking.handle(record, staged)

    def show(self, record: EpochRecord) -> None:
        cfg = self.ctx.cfg
        self.ctx.console.say(progress_line(record, cfg.train.epochs, cfg.tracker.monitor,
                                           bool(cfg.train.eval_every_n_steps)))
        self.shown.add(point(record))

    def show_the_rest(self, history: list[EpochRecord]) -> None:
        """The records of this part of the run that its history holds and the terminal did
        not show: events still on their way when a stop shut Ray down, or records the
        summary repaired from checkpoints (W&B gets them in ``finalize_run``)."""
        for record in history:
            if point(record) > self.recorded_before and point(record) not in self.shown:
                self.show(record)


def where_it_stands(summary: Summary) -> str:
    """After which epoch a run stopped, and its best so far."""
    text = f"after epoch {summary['epochs_completed']} of {summary['epochs_planned']}"
    by_steps = bool(summary["config"]["train"].get("eval_every_n_steps"))
    if by_steps and summary.get("global_step") is not None:
        text += f" (global step {summary['global_step']})"
    best = summary.get("best_metrics")
    if best:
        value = best.get(summary["monitor"])
        saved = summary["best_checkpoint"] or "not saved by this checkpoint policy"
        text += (f"; best so far: {where(best, by_steps)}, {summary['monitor']}="
                 f"{value:.6g} ({saved})")
    return text


@dataclass(frozen=True)
class Stopped:
    """Why a run did not end by itself."""

    status: str  # summary.json's: interrupted | failed
    what: str  # one line
    exit_code: int
    stop_ray: bool  # Ray Train may still be running it (or waiting for workers)


def fit(trainer: Any, guard: SignalGuard, run_dir: str, tick: Callable[[], None],
        grace: Callable[[Interrupted], str] = lambda signal: "none") -> Stopped | None:
    """Run ``trainer.fit()``; None when it ended by itself. A user's mistake raises
    ``UserError``. ``tick``: called while waiting; raises to stop the wait. ``grace``: after a
    signal, ``saved`` when the workers saved the step in flight and returned, ``ended`` when
    the run had ended by itself meanwhile, else the workers are stopped at once."""
    from ray.exceptions import RayActorError
    from ray.train import TrainingFailedError

    try:
        guard.run(trainer.fit, tick)
    except TrainingFailedError as exc:
        message = user_error_in(exc)
        if message:
            raise UserError(message) from None
        log = storage.join(run_dir, FAILURE_LOG)  # the workers' tracebacks, not printed
        try:
            storage.write_bytes(log, f"{exc}\n".encode())
            details = f" (details: {log})"
        except OSError:  # the storage itself is what failed: the line says enough
            details = ""
        return Stopped("failed", f"training failed: {failure_summary(exc)}{details}", 1, False)
    except RayActorError as exc:  # the controller (or its node) is gone
        return Stopped("failed", f"the Ray Train controller died ({type(exc).__name__})", 1,
                       False)
    except WorkersLost as exc:
        return Stopped("failed", str(exc), 1, True)
    except Interrupted as exc:
        outcome = grace(exc)
        if outcome == "ended":
            return None
        if outcome == "saved":
            return Stopped("interrupted", f"interrupted by {exc}", exc.exit_code, False)
        return Stopped("interrupted", f"interrupted by {exc}", exc.exit_code, True)
    return None


def grace_period(ctx: RunContext, guard: SignalGuard, stop_requests: Any,
                 pump: EventPump) -> Callable[[Interrupted], str]:
    """After a signal: ask the workers to save the step in flight and stop, and wait for
    them up to ``failure.preempt_grace_s`` (a second signal still stops at once)."""
    def wait(signal: Interrupted) -> str:
        if stop_requests is None:
            return "none"
        seconds = ctx.cfg.failure.preempt_grace_s
        ctx.console.say(f"{signal}: saving the step in flight, then stopping (up to "
                        f"{seconds} s, failure.preempt_grace_s; send it again to stop now)")
        try:
            stop_requests.put(str(signal))
        except Exception:  # noqa: BLE001 - Ray itself is going: stop as without grace
            return "none"
        if not guard.wait_for_fit(timeout=seconds):
            if guard.now:
                ctx.console.say(f"{signal} again: stopping now, without the step in flight")
            return "none"
        time.sleep(0.5)  # the pump's last events
        if not pump.preempted:  # the workers were done before they heard of it
            ctx.console.say("the run had ended by itself: nothing left to save")
            return "ended"
        ctx.console.say("the step in flight is saved: --resume goes on at the next one")
        return "saved"

    return wait


def run_training(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
                 console: Console | None = None,
                 prepared: Prepared | None = None) -> Summary:
    """One run, to its end: its summary. A run that fails or is interrupted still writes
    its summary (status ``failed`` or ``interrupted``) and raises ``TrainingError``.
    ``prepared``: the run directory's fate, when the caller decided it already."""
    console = console or Console()
    prepared = prepared or prepare(cfg, resume=resume, overwrite=overwrite)
    # A signal from here on stops the run cleanly; a second, later one without waiting for
    # the step in flight, and still with the record written.
    with SignalGuard(keep_record=True) as guard:
        ctx = start_run(prepared, console, guard)
        try:
            summary, stopped = train_and_record(ctx)
        finally:
            unlock(ctx.run_dir)
    return ended(summary, stopped)


def ended(summary: Summary, stopped: Stopped | None) -> Summary:
    """The summary of a run that ended by itself; for one that stopped, the ``TrainingError``
    (its one line and exit code) that its summary is already written for."""
    if stopped:
        raise TrainingError(f"{stopped.what} {where_it_stands(summary)}",
                            exit_code=stopped.exit_code)
    return summary


def train_and_record(ctx: RunContext,
                     ray_train: RayTrain = RAY_TRAIN) -> tuple[Summary, Stopped | None]:
    """Train on Ray, then write the record: (summary, why it stopped if it did).
    ``ray_train``: what of Ray the loop uses (a unit test's scripted twin)."""
    recorded = read_history(ctx.run_dir)  # a resume's: the parts before printed them
    handle = EpochHandler(ctx, point(recorded[-1]) if recorded else (0, 0))
    channel = ray_train.channel()
    try:
        return _train_and_record(ctx, handle, channel, ray_train)
    finally:
        channel.close()


def _train_and_record(ctx: RunContext, handle: EpochHandler, channel: Channel,
                      ray_train: RayTrain) -> tuple[Summary, Stopped | None]:
    cfg, guard, tracking = ctx.cfg, ctx.guard, ctx.tracking
    assert guard is not None  # a run's context holds it (a trial's has none: it never comes here)

    def tick() -> None:  # while fit runs
        pump.check()
        watchdog.tick()

    pump = EventPump(channel("events"), handle, on_failure=handle.failed)
    watchdog = Watchdog(needs(cfg, ctx.use_gpu), cfg.failure.worker_wait_s, ctx.console.say,
                        room=ray_train.room)
    # Only the torch engine's loop looks for stop requests (after every optimizer step).
    stop_requests = (channel("stop") if cfg.engine == "torch" and cfg.failure.preempt_grace_s
                     else None)
    try:
        if ctx.ray_datasets:
            check_data_room(cfg, ctx.capacity)
        trainer = ray_train.build(cfg, ctx.run_dir, ctx.use_gpu,
                                  log_model=tracking.log_model_setting, events=pump.queue,
                                  stop_requests=stop_requests, ray_datasets=ctx.ray_datasets,
                                  loop_config={MODE_SOURCE_KEY: ctx.mode_source,
                                               PROVENANCE_KEY: ctx.provenance})
        with ctx.console.progress(cfg.train.epochs, cfg.name), pump:
            stopped = fit(trainer, guard, ctx.run_dir, tick,
                          grace_period(ctx, guard, stop_requests, pump))
    except UserError:
        if guard.fit_running():  # Ray would retry it (max_failures): never useful
            ray_train.stop(pump.controller, guard)
        tracking.abort()
        if ctx.start is not StartMode.RESUME:  # nothing of a run that never could work stays
            storage.delete_dir(ctx.run_dir)
        if ctx.replaced is not None:  # and the run that --overwrite was to replace is back
            ctx.replaced.restore()
        raise
    except BaseException:
        tracking.abort()
        if ctx.replaced is not None:  # the new run trained, or stopped with its record
            ctx.replaced.discard()
        raise
    if ctx.replaced is not None:
        ctx.replaced.discard()
    if stopped and stopped.stop_ray:  # the workers and the controller stop (a local Ray too)
        ray_train.stop(pump.controller, guard)
    try:
        summary = finalize_run(ctx, wandb_errors=pump.errors,
                               status=stopped.status if stopped else None)
    except OSError as exc:  # storage unreachable: what was saved stays, the run resumes
        what = stopped.what if stopped else "the run ended"
        raise TrainingError(f"{what}; the storage did not take its summary either "
                            f"({one_line(exc)[:160]}); when it is reachable again",
                            exit_code=1) from None
    handle.show_the_rest(summary["history"])
    return summary, stopped
