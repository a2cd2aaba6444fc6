"""``orchestrator train``: one data-parallel run on Ray Train, ending with summary.json."""

from __future__ import annotations

import re
import sys
import threading
from typing import Any

from orchestrator import storage
from orchestrator.cluster import (
    attaches_to_cluster,
    check_resources,
    cluster_capacity,
    init_ray,
    local_resources,
    pace_reports,
)
from orchestrator.config import UserError
from orchestrator.recorder import RunRecorder
from orchestrator.summary import finalize_run
from workers.config import RunConfig
from workers.engines import train_loop_for
from workers.loop import RANK_KEY
from workers.policy import ray_keep_settings


class TrainingError(Exception):
    """Training itself failed (exit code 1)."""


# Errors raised inside workers that are the user's input, not a training failure.
_USER_ERRORS = re.compile(r"(?:MonitorNotReportedError|WorkloadError): (.+)")


def _user_error_in(exc: BaseException) -> str | None:
    match = _USER_ERRORS.search(str(exc))
    return match.group(1).strip() if match else None


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


def build_trainer(cfg: RunConfig, run_dir: str, use_gpu: bool, events: Any = None,
                  callbacks: tuple[Any, ...] | list[Any] = (), label: str | None = None,
                  log_model: str | None = None) -> Any:
    """``events``: the queue to the driver's W&B logging; ``callbacks``: extra Ray Train
    callbacks (Tune's report callback); ``label``: prefix of the progress lines;
    ``log_model``: the wandb.log_model choice when W&B is on (models are staged for it)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    pace_reports()
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_for(cfg.engine),
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RayRunConfig(
            name=cfg.name,
            storage_path=storage.resolve(cfg.storage_path),
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
            checkpoint_config=CheckpointConfig(
                **ray_keep_settings(cfg.checkpoint.policy, RANK_KEY)
            ),
            callbacks=[
                RunRecorder(run_dir, cfg.train.epochs, cfg.tracker.monitor, events, label,
                            log_model),
                *callbacks,
            ],
            # Ray's per-report INFO lines would drown the one progress line per epoch.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


class EventPump:
    """Drains the controller's event queue into W&B on a driver thread while ``fit`` runs.

    A W&B hiccup must not kill an hour of training: a failed log is reported, not raised.
    """

    def __init__(self, wb: Any) -> None:
        from ray.util.queue import Queue

        self.wb = wb
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.errors: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wandb-events", daemon=True)

    def __enter__(self) -> EventPump:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                record, checkpoint_path = self.queue.get(timeout=0.2)
            except Empty:
                if self._done.is_set():
                    return
                continue
            try:
                self.wb.handle(record, checkpoint_path)
            except Exception as exc:  # noqa: BLE001 - logged and summarised, never fatal
                self.errors.append(f"epoch {record.get('epoch')}: {type(exc).__name__}: {exc}")
                print(f"warning: W&B logging failed: {self.errors[-1]}", file=sys.stderr)


def run_training(
    cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, say: Any = print
) -> dict[str, Any]:
    from ray.train import TrainingFailedError

    from orchestrator.wandb_run import NullRun, open_run

    run_dir = storage.join(storage.resolve(cfg.storage_path), cfg.name)
    mode = prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if not attaches_to_cluster():
        check_resources(cfg, local_resources())  # fail before starting Ray at all
    local = init_ray()
    use_gpu = check_resources(cfg, cluster_capacity(local))
    if mode == "overwrite":
        storage.delete_dir(run_dir)
    try:
        wb = open_run(cfg, run_dir)  # before training: a bad key or no network fails here
    except UserError:
        if mode != "resume":
            storage.delete_dir(run_dir)
        raise
    say({
        "fresh": f"Starting run {cfg.name!r} in {run_dir}",
        "overwrite": f"Replacing the earlier run {cfg.name!r} in {run_dir} (--overwrite)",
        "resume": f"Resuming run {cfg.name!r} from its latest checkpoint in {run_dir} (--resume)",
    }[mode])
    say(f"{cfg.scaling.num_workers} workers on {'GPU (NCCL)' if use_gpu else 'CPU (gloo)'}, "
        f"{cfg.train.epochs} epochs, policy {cfg.checkpoint.policy}, "
        f"monitor {cfg.tracker.monitor}, W&B {getattr(wb, 'mode', 'disabled')}")

    pump = EventPump(wb) if not isinstance(wb, NullRun) else None
    trainer = build_trainer(cfg, run_dir, use_gpu, pump.queue if pump else None,
                            log_model=cfg.wandb.log_model if pump else None)
    try:
        if pump:
            with pump:
                trainer.fit()
        else:
            trainer.fit()
    except TrainingFailedError as exc:
        wb.abort()
        message = _user_error_in(exc)
        if message:
            if mode != "resume":  # nothing of a run that never could work is left behind
                storage.delete_dir(run_dir)
            raise UserError(message) from None
        raise TrainingError(f"training failed: {exc}") from exc
    except BaseException:
        wb.abort()
        raise

    return finalize_run(cfg, run_dir, wb, use_gpu=use_gpu, start=mode, say=say,
                        wandb_errors=pump.errors if pump else [])
