"""Ray Train wiring: the ``TorchTrainer`` for a run, and the driver's end of its event queue."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from orchestrator import storage
from orchestrator.controller.recorder import (
    CONTROLLER,
    PREEMPTED,
    USER_ERROR,
    WORKER_FAILED,
    RunRecorder,
)
from orchestrator.errors import UserError
from orchestrator.start.cluster import pace_reports
from orchestrator.training.datasets import Streams
from workers.compat import kill_train_controller, torch_trainer_class
from workers.contract.config import RunConfig
from workers.contract.names import RANK_KEY, STOP_QUEUE_KEY
from workers.decisions.policy import ray_keep_settings
from workers.engines import train_loop_for


def build_trainer(cfg: RunConfig, run_dir: str, use_gpu: bool, *, log_model: str = "none",
                  events: Any = None, callbacks: tuple[Any, ...] | list[Any] = (),
                  stop_requests: Any = None, streams: Streams | None = None,
                  loop_config: dict[str, Any] | None = None) -> Any:
    """``log_model``: the W&B run's ``log_model_setting`` (``none``: nothing is staged);
    ``events``: the stream to the driver (``EventPump.queue``); ``callbacks``: extra Ray Train
    callbacks (Tune's report callback); ``stop_requests``: the stream through which the
    driver asks the workers to save the step in flight and stop (``workers.loop.preempt``);
    ``streams``: the workload's Ray Dataset splits (``training.datasets``), sharded by Ray;
    ``loop_config``: more for the workers beside the config (a PBT trial's place, ``PBT_KEY``)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig

    pace_reports()
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    workers = cfg.scaling.num_workers  # [min, max]: Ray Train's elastic worker group
    return torch_trainer_class(ray_datasets=streams is not None)(
        train_loop_for(cfg.engine),
        train_loop_config={**cfg.to_dict(), **(
            {STOP_QUEUE_KEY: stop_requests} if stop_requests is not None else {}),
            **(streams.loop_config() if streams else {}), **(loop_config or {})},
        **(streams.trainer_options() if streams else {}),
        scaling_config=ScalingConfig(
            num_workers=tuple(workers) if isinstance(workers, list) else workers,
            use_gpu=use_gpu, resources_per_worker=resources,
        ),
        run_config=RayRunConfig(
            name=cfg.name,
            storage_path=storage.resolve(cfg.storage_path),
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
            checkpoint_config=CheckpointConfig(
                **ray_keep_settings(cfg.checkpoint.policy, RANK_KEY)
            ),
            callbacks=[RunRecorder(run_dir, log_model, events), *callbacks],
            # Ray's per-report INFO lines would drown the one progress line per epoch.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


class EventPump:
    """Drains the controller's event queue on a driver thread while ``fit`` runs, handing each
    (record, staged model) to ``handle`` (print the epoch, log it to W&B).

    A failure there (W&B's network, say) must not kill an hour of training: it is reported
    and kept in ``errors``, never raised. A queue that is gone (Ray shut down under it) just
    ends the pump: no W&B call failed, and the records it did not bring are in the history,
    printed from there (``training.run.EpochHandler.show_the_rest``).
    """

    def __init__(self, queue: Any, handle: Callable[[dict[str, Any], str | None], None],
                 on_failure: Callable[[str], None] = lambda what: None) -> None:
        """``queue``: the run channel's events stream (``workers.loop.channel``)."""
        self.handle, self.on_failure = handle, on_failure
        self.queue = queue
        self.errors: list[str] = []  # W&B logging calls (or printing) that failed
        self.controller: Any = None  # the Train controller's actor handle, once it reported
        self.user_error: str | None = None  # a worker's user error, never retried
        self.preempted: str | None = None  # the checkpoint of the step a signal had saved
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="run-events", daemon=True)

    def check(self) -> None:
        """Raise a worker's user error as soon as it is known (Ray would retry it)."""
        if self.user_error:
            raise UserError(self.user_error)

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
                record, staged = self.queue.get(timeout=0.2)
                if record == CONTROLLER:
                    self.controller = staged
                    continue
                if record == USER_ERROR:
                    self.user_error = self.user_error or staged
                    continue
                if record == WORKER_FAILED:
                    self.on_failure(staged)
                    continue
                if record == PREEMPTED:
                    self.preempted = staged or "saved"
                    continue
            except Empty:
                if self._done.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001 - the queue is gone (Ray shut down): not W&B's
                return
            try:
                self.handle(record, staged)
            except Exception as exc:  # noqa: BLE001 - logged and summarised, never fatal
                self.errors.append(f"epoch {record.get('epoch')}: {type(exc).__name__}: {exc}")
                print(f"warning: W&B logging failed: {self.errors[-1]}", file=sys.stderr)


def stop_training(controller: Any, guard: Any) -> None:
    """Stop a fit that is still running (interrupted, or waiting for lost workers), then Ray.
    The controller goes first (its workers, actors it owns, go with it), so that the thread
    blocked in ``fit`` returns before Ray shuts down under it; a save in flight is cut short,
    which its atomic writes make a checkpoint directory without metadata.json: never used."""
    import ray

    if controller is not None:
        try:
            kill_train_controller(controller)
        except Exception:  # noqa: BLE001 - already gone
            pass
        guard.wait_for_fit(timeout=30)
    # Without its handle (stopped before the first report), the controller goes with Ray:
    # a local Ray goes entirely; on a cluster, the actors this driver owns die with it.
    ray.shutdown()
