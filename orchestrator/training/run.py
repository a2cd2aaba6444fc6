"""``orchestrator train``: one data-parallel run on Ray Train, ending with summary.json."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
from orchestrator.results.summary import finalize_run, remove_unregistered_checkpoints
from orchestrator.start.cluster import (
    attaches_to_cluster,
    check_resources,
    cluster_capacity,
    init_ray,
    local_resources,
)
from orchestrator.start.console import Console
from orchestrator.start.interrupts import Interrupted, SignalGuard
from orchestrator.start.run_dir import open_in, prepare_run_dir, unlock
from orchestrator.start.watchdog import Watchdog, WorkersLost, needs
from orchestrator.training.ray_trainer import EventPump, build_trainer, stop_training
from workers.contract.config import RunConfig
from workers.contract.names import FAILURE_LOG


def start_line(cfg: RunConfig, run_dir: str, mode: str) -> str:
    return {
        "fresh": f"Starting run {cfg.name!r} in {run_dir}",
        "overwrite": f"Replacing the earlier run {cfg.name!r} in {run_dir} (--overwrite)",
        "resume": f"Resuming run {cfg.name!r} from its latest checkpoint in {run_dir} (--resume)",
    }[mode]


def start_run(cfg: RunConfig, *, resume: bool, overwrite: bool,
              console: Console) -> tuple[str, str, bool, Any]:
    """Everything checked and opened before training: the run directory's fate, the
    cluster's capacity, the W&B run. Returns (run_dir, start mode, use_gpu, W&B run)."""
    from orchestrator.tracking.wandb_run import open_run

    run_dir = storage.run_dir(cfg)
    mode = prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if mode == "resume":  # nothing intact to resume from: exit 2 before anything starts
        remove_unregistered_checkpoints(run_dir)  # what a killed run left in flight
        chosen, damaged = resume_point(run_dir)
        for problem in damaged:
            console.say(f"warning: damaged checkpoint skipped: {problem}")
        if damaged:
            console.say(f"resuming from {chosen}, the newest intact checkpoint")
    if not attaches_to_cluster():
        check_resources(cfg, local_resources())  # fail before starting Ray at all
    local = init_ray(console.verbose)
    use_gpu = check_resources(cfg, cluster_capacity(local))
    # Before training: a bad key or no network fails here, with the old run (if any) intact.
    wb = open_in(run_dir, mode, "run", lambda: open_run(cfg, run_dir))
    console.say(start_line(cfg, run_dir, mode))
    console.say(f"{cfg.scaling.describe_workers()} on "
                f"{'GPU (NCCL)' if use_gpu else 'CPU (gloo)'}, {cfg.train.epochs} epochs, "
                f"policy {cfg.checkpoint.policy}, monitor {cfg.tracker.monitor}, W&B {wb.mode}")
    return run_dir, mode, use_gpu, wb


def epoch_handler(cfg: RunConfig, wb: Any, console: Console):
    """What the driver does with each epoch's record: print it, log it to W&B."""
    seen = {"epoch": 0, "workers": None}

    def handle(record: dict[str, Any], staged: str | None) -> None:
        if record["epoch"] <= seen["epoch"]:  # Ray restarted the workers (max_failures)
            console.say(f"workers restarted: training again from epoch {record['epoch']} "
                        "(the latest checkpoint)")
        workers = record.get("workers")
        if seen["workers"] not in (None, workers):  # an elastic run resized
            console.say(f"the cluster changed: epoch {record['epoch']} trained on {workers} "
                        f"worker{'s' if workers != 1 else ''} (was {seen['workers']}), from "
                        "the latest checkpoint")
        seen["epoch"], seen["workers"] = record["epoch"], workers
        console.say(progress_line(record, cfg.train.epochs, cfg.tracker.monitor))
        bad = nonfinite(record)
        if bad and cfg.train.stop_on_nonfinite:
            console.say(f"epoch {record['epoch']}: {', '.join(bad)} not finite; the run stops "
                        "here (train.stop_on_nonfinite) and keeps its best so far")
        console.advance(completed=record["epoch"])
        wb.handle(record, staged)

    return handle


def where_it_stands(summary: dict[str, Any]) -> str:
    """After which epoch a run stopped, and its best so far."""
    text = f"after epoch {summary['epochs_completed']} of {summary['epochs_planned']}"
    best = summary.get("best_metrics")
    if best:
        value = best.get(summary["monitor"])
        where = summary["best_checkpoint"] or "not saved by this checkpoint policy"
        text += (f"; best so far: epoch {summary['best_epoch']}, {summary['monitor']}="
                 f"{value:.6g} ({where})")
    return text


@dataclass(frozen=True)
class Stopped:
    """Why a run did not end by itself."""

    status: str  # summary.json's: interrupted | failed
    what: str  # one line
    exit_code: int
    stop_ray: bool  # Ray Train may still be running it (or waiting for workers)


def fit(trainer: Any, guard: SignalGuard, run_dir: str,
        tick: Callable[[], None]) -> Stopped | None:
    """Run ``trainer.fit()``; None when it ended by itself. A user's mistake raises
    ``UserError``. ``tick``: called while waiting; raises to stop the wait."""
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
        return Stopped("interrupted", f"interrupted by {exc}", exc.exit_code, True)
    return None


def run_training(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
                 console: Console | None = None) -> dict[str, Any]:
    """One run, to its end: its summary. A run that fails or is interrupted still writes
    its summary (status ``failed`` or ``interrupted``) and raises ``TrainingError``."""
    console = console or Console()
    with SignalGuard() as guard:  # a signal from here on stops the run cleanly
        run_dir, mode, use_gpu, wb = start_run(cfg, resume=resume, overwrite=overwrite,
                                               console=console)
        try:
            summary, stopped = train_and_record(cfg, run_dir, mode, use_gpu, wb, guard,
                                                console)
        finally:
            unlock(run_dir)
    if stopped:
        raise TrainingError(f"{stopped.what} {where_it_stands(summary)}",
                            exit_code=stopped.exit_code)
    return summary


def train_and_record(cfg: RunConfig, run_dir: str, mode: str, use_gpu: bool, wb: Any,
                     guard: SignalGuard,
                     console: Console) -> tuple[dict[str, Any], Stopped | None]:
    """Train on Ray, then write the record: (summary, why it stopped if it did)."""
    pump = EventPump(epoch_handler(cfg, wb, console))
    watchdog = Watchdog(needs(cfg, use_gpu), cfg.failure.worker_wait_s, console.say)
    trainer = build_trainer(cfg, run_dir, use_gpu, log_model=wb.log_model_setting,
                            events=pump.queue)
    try:
        with console.progress(cfg.train.epochs, cfg.name), pump:
            stopped = fit(trainer, guard, run_dir, lambda: (pump.check(), watchdog.tick()))
    except UserError:
        if guard.fit_running():  # Ray would retry it (max_failures): never useful
            stop_training(pump.controller, guard)
        wb.abort()
        if mode != "resume":  # nothing of a run that never could work is left behind
            storage.delete_dir(run_dir)
        raise
    except BaseException:
        wb.abort()
        raise
    if stopped and stopped.stop_ray:  # the workers and the controller stop (a local Ray too)
        stop_training(pump.controller, guard)
    try:
        summary = finalize_run(cfg, run_dir, wb, use_gpu=use_gpu, start=mode,
                               say=console.say, wandb_errors=pump.errors,
                               status=stopped.status if stopped else None)
    except OSError as exc:  # storage unreachable: what was saved stays, the run resumes
        what = stopped.what if stopped else "the run ended"
        raise TrainingError(f"{what}; the storage did not take its summary either "
                            f"({one_line(exc)[:160]}); when it is reachable again",
                            exit_code=1) from None
    return summary, stopped
