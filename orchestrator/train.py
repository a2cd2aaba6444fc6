"""``orchestrator train``: one data-parallel run on Ray Train, ending with summary.json."""

from __future__ import annotations

import posixpath
import re
import sys
import tempfile
import threading
from typing import Any

from orchestrator import storage
from orchestrator.cluster import attaches_to_cluster, check_resources, init_ray, local_resources
from orchestrator.config import UserError
from orchestrator.recorder import HISTORY_FILE, RunRecorder
from workers.config import RunConfig
from workers.engines import train_loop_for
from workers.loop import RANK_KEY
from workers.policy import ray_keep_settings

SUMMARY_FILE = "summary.json"
PLOT_FILE = "training_curves.png"


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


def build_trainer(cfg: RunConfig, run_dir: str, use_gpu: bool, events: Any = None) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

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
            callbacks=[RunRecorder(run_dir, cfg.train.epochs, cfg.tracker.monitor, events)],
            # Ray's per-report INFO lines would drown the one progress line per epoch.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def kept_checkpoints(result: Any, run_dir: str) -> list[dict[str, Any]]:
    """The checkpoints Ray kept, oldest first: epoch, path and whether it holds the best."""
    kept = []
    for checkpoint, metrics in result.best_checkpoints or []:
        kept.append({
            "epoch": int(metrics["epoch"]),
            "path": storage.join(run_dir, posixpath.basename(checkpoint.path)),
            "is_best": bool(metrics.get("is_best", False)),
            "checkpoint": checkpoint,
        })
    return sorted(kept, key=lambda c: c["epoch"])


def evaluate_test_split(cfg: RunConfig, checkpoint: Any, use_gpu: bool) -> dict[str, float] | None:
    """The test split, once, with the best weights, in one Ray task next to the data."""
    import ray

    from workers.restore import evaluate_checkpoint

    task = ray.remote(evaluate_checkpoint).options(num_cpus=1, num_gpus=1 if use_gpu else 0)
    return ray.get(task.remote(cfg.to_dict(), checkpoint, "test"))


def summarize(
    cfg: RunConfig, run_dir: str, result: Any, use_gpu: bool, mode: str
) -> dict[str, Any]:
    from workers.tracker import BestTracker

    history = storage.read_json(storage.join(run_dir, HISTORY_FILE))["history"]
    best = next((r for r in reversed(history) if r.get("is_best")), None)
    kept = kept_checkpoints(result, run_dir)
    best_ckpt = next((c for c in kept if best and c["epoch"] == best["epoch"]), None)
    test_metrics = None
    if best_ckpt is not None:
        test_metrics = evaluate_test_split(cfg, best_ckpt["checkpoint"], use_gpu)
    tracker = BestTracker(cfg.tracker.monitor, cfg.tracker.mode)
    metric_keys = lambda r: {k: v for k, v in r.items() if k != "checkpoint"}  # noqa: E731
    return {
        "name": cfg.name,
        "run_dir": run_dir,
        "start": mode,
        "monitor": tracker.monitor,
        "mode": tracker.mode,
        "policy": cfg.checkpoint.policy,
        "best_checkpoint": best_ckpt["path"] if best_ckpt else None,
        "best_epoch": best["epoch"] if best else None,
        "best_metrics": metric_keys(best) if best else None,
        "test_metrics": test_metrics,
        "epochs_completed": history[-1]["epoch"] if history else 0,
        "epochs_planned": cfg.train.epochs,
        "stopped_early": bool(history) and history[-1]["epoch"] < cfg.train.epochs,
        "checkpoints": [{k: v for k, v in c.items() if k != "checkpoint"} for c in kept],
        "history": history,
        "config": cfg.to_dict(),
    }


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


def write_plot(summary: dict[str, Any], run_dir: str) -> str | None:
    from orchestrator.plots import training_curves_png

    if not summary["history"]:
        return None
    png = training_curves_png(summary["history"], summary["monitor"], summary["best_epoch"])
    path = storage.join(run_dir, PLOT_FILE)
    storage.write_bytes(path, png)
    if storage.is_uri(path):  # W&B needs a local file
        local = tempfile.NamedTemporaryFile(suffix=".png", delete=False)
        local.write(png)
        local.close()
        return local.name
    return path


def run_training(
    cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, say: Any = print
) -> dict[str, Any]:
    import ray
    from ray.train import TrainingFailedError

    from orchestrator.wandb_run import NullRun, open_run

    run_dir = storage.join(storage.resolve(cfg.storage_path), cfg.name)
    mode = prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if not attaches_to_cluster():
        check_resources(cfg, local_resources())  # fail before starting Ray at all
    init_ray()
    use_gpu = check_resources(cfg, ray.cluster_resources())
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
    trainer = build_trainer(cfg, run_dir, use_gpu, pump.queue if pump else None)
    try:
        if pump:
            with pump:
                result = trainer.fit()
        else:
            result = trainer.fit()
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

    summary = summarize(cfg, run_dir, result, use_gpu, mode)
    summary["wandb"] = wb.finish(summary, write_plot(summary, run_dir))
    if pump and pump.errors:
        summary["wandb"]["errors"] = pump.errors
    if summary["wandb"].get("sync"):
        say(f"W&B offline run: {summary['wandb']['run']}  (upload: {summary['wandb']['sync']})")
    storage.write_json(storage.join(run_dir, SUMMARY_FILE), summary)
    return summary
