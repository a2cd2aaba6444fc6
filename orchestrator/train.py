"""``orchestrator train``: one data-parallel run on Ray Train, ending with summary.json."""

from __future__ import annotations

from typing import Any

from orchestrator import storage
from orchestrator.checkpoints import resume_point
from orchestrator.cluster import (
    attaches_to_cluster,
    check_resources,
    cluster_capacity,
    init_ray,
    local_resources,
)
from orchestrator.console import Console
from orchestrator.errors import TrainingError, UserError, failure_summary, user_error_in
from orchestrator.records import progress_line
from orchestrator.summary import finalize_run
from orchestrator.trainer import EventPump, build_trainer
from workers.config import RunConfig


def prepare_run_dir(run_dir: str, *, resume: bool, overwrite: bool) -> str:
    """Decide, explicitly, whether this invocation resumes, replaces or starts a run."""
    existing = storage.is_nonempty_dir(run_dir)
    if existing and not (resume or overwrite):
        raise UserError(
            f"{run_dir}: a run with this name already exists; pass --resume to continue it, "
            "--overwrite to replace it, or choose another name (--set name=...)"
        )
    if existing and resume:
        return "resume"
    if existing and overwrite:
        return "overwrite"
    return "fresh"


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
    from orchestrator.wandb_log import open_run

    run_dir = storage.run_dir(cfg)
    mode = prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if mode == "resume":  # nothing intact to resume from: exit 2 before anything starts
        chosen, damaged = resume_point(run_dir)
        for problem in damaged:
            console.say(f"warning: damaged checkpoint skipped: {problem}")
        if damaged:
            console.say(f"resuming from {chosen}, the newest intact checkpoint")
    if not attaches_to_cluster():
        check_resources(cfg, local_resources())  # fail before starting Ray at all
    local = init_ray(console.verbose)
    use_gpu = check_resources(cfg, cluster_capacity(local))
    if mode == "overwrite":
        storage.delete_dir(run_dir)
    try:
        wb = open_run(cfg, run_dir)  # before training: a bad key or no network fails here
    except UserError:
        if mode != "resume":
            storage.delete_dir(run_dir)
        raise
    console.say(start_line(cfg, run_dir, mode))
    console.say(f"{cfg.scaling.num_workers} workers on "
                f"{'GPU (NCCL)' if use_gpu else 'CPU (gloo)'}, {cfg.train.epochs} epochs, "
                f"policy {cfg.checkpoint.policy}, monitor {cfg.tracker.monitor}, W&B {wb.mode}")
    return run_dir, mode, use_gpu, wb


def epoch_handler(cfg: RunConfig, wb: Any, console: Console):
    """What the driver does with each epoch's record: print it, log it to W&B."""
    seen = {"epoch": 0}

    def handle(record: dict[str, Any], staged: str | None) -> None:
        if record["epoch"] <= seen["epoch"]:  # Ray restarted the workers (max_failures)
            console.say(f"workers restarted: training again from epoch {record['epoch']} "
                        "(the latest checkpoint)")
        seen["epoch"] = record["epoch"]
        console.say(progress_line(record, cfg.train.epochs, cfg.tracker.monitor))
        console.advance(completed=record["epoch"])
        wb.handle(record, staged)

    return handle


def run_training(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
                 console: Console | None = None) -> dict[str, Any]:
    from ray.train import TrainingFailedError

    console = console or Console()
    run_dir, mode, use_gpu, wb = start_run(cfg, resume=resume, overwrite=overwrite,
                                           console=console)
    pump = EventPump(epoch_handler(cfg, wb, console))
    trainer = build_trainer(cfg, run_dir, use_gpu, log_model=wb.log_model_setting,
                            events=pump.queue)
    try:
        with console.progress(cfg.train.epochs, cfg.name), pump:
            trainer.fit()
    except TrainingFailedError as exc:
        wb.abort()
        message = user_error_in(exc)
        if message:
            if mode != "resume":  # nothing of a run that never could work is left behind
                storage.delete_dir(run_dir)
            raise UserError(message) from None
        raise TrainingError(f"training failed: {failure_summary(exc)} (rerun with --verbose "
                            "to see the workers' logs)") from exc
    except BaseException:
        wb.abort()
        raise
    return finalize_run(cfg, run_dir, wb, use_gpu=use_gpu, start=mode, say=console.say,
                        wandb_errors=pump.errors)
