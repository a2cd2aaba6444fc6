"""Ray Train wiring: the ``TorchTrainer`` for a run, the driver's end of its event queue, and
``RayTrain``: all that the driver's loop asks of Ray, as one seam a unit test replaces."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator import storage
from orchestrator.errors import UserError
from orchestrator.start.cluster import pace_reports
from orchestrator.start.watchdog import room_now
from orchestrator.training.datasets import RayDatasets
from orchestrator.training.events import (
    ControllerStarted,
    EpochEvent,
    Event,
    Preempted,
    UserErrorEvent,
    WorkerFailed,
)
from orchestrator.training.recorder import RunRecorder
from workers.checkpoint.policy import ray_keep_settings
from workers.compat import kill_train_controller, torch_trainer_class
from workers.contract.config import RunConfig
from workers.contract.names import RANK_KEY, STOP_QUEUE_KEY
from workers.contract.records import EpochRecord
from workers.engines import train_loop_for
from workers.loop.channel import open_channel


def build_trainer(cfg: RunConfig, run_dir: str, use_gpu: bool, *, log_model: str = "none",
                  events: Any = None, callbacks: tuple[Any, ...] | list[Any] = (),
                  stop_requests: Any = None, ray_datasets: RayDatasets | None = None,
                  loop_config: dict[str, Any] | None = None) -> Any:
    """``log_model``: the W&B run's ``log_model_setting`` (``none``: nothing is staged);
    ``events``: the queue to the driver (``EventPump.queue``); ``callbacks``: extra Ray Train
    callbacks (Tune's report callback); ``stop_requests``: the queue through which the
    driver asks the workers to save the step in flight and stop (``workers.loop.preempt``);
    ``ray_datasets``: the workload's Ray Dataset splits (``training.datasets``), sharded by Ray;
    ``loop_config``: more for the workers beside the config (a PBT trial's place, ``PBT_KEY``)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig

    pace_reports()
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    workers = cfg.scaling.num_workers  # [min, max]: Ray Train's elastic worker group
    # The ignores below: mypy reads ray.train's v1 ScalingConfig, RunConfig and Callback; at
    # run time ray.train exports the v2 ones (elastic sizes, logging_config, UserCallback).
    return torch_trainer_class(ray_datasets=ray_datasets is not None)(
        train_loop_for(cfg.engine),
        train_loop_config={**cfg.to_dict(), **(
            {STOP_QUEUE_KEY: stop_requests} if stop_requests is not None else {}),
            **(ray_datasets.loop_config() if ray_datasets else {}), **(loop_config or {})},
        **(ray_datasets.trainer_options() if ray_datasets else {}),
        scaling_config=ScalingConfig(
            num_workers=tuple(workers) if isinstance(workers, list) else workers,  # type: ignore[arg-type]
            use_gpu=use_gpu, resources_per_worker=resources,
        ),
        run_config=RayRunConfig(  # type: ignore[call-arg]
            name=cfg.name,
            storage_path=storage.resolve(cfg.storage_path),
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
            checkpoint_config=CheckpointConfig(
                **ray_keep_settings(cfg.checkpoint.policy, RANK_KEY, cfg.checkpoint.keep_top_k,
                                   bool(cfg.tracker.also_monitor))
            ),
            callbacks=[RunRecorder(run_dir, log_model, events), *callbacks],  # type: ignore[list-item]
            # Ray's per-report INFO lines would drown the one progress line per epoch.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


class EventPump:
    """Drains the controller's event queue on a driver thread while ``fit`` runs, handing each
    record (``EpochEvent``: the record, the staged model) to ``handle`` (print the epoch, log
    it to W&B), and keeping the run's other news (``training.events``) for the driver.

    A failure there (W&B's network, say) must not kill an hour of training: it is reported
    and kept in ``errors``, never raised. A queue that is gone (Ray shut down under it) just
    ends the pump: no W&B call failed, and the records it did not bring are in the history,
    printed from there (``training.driver.EpochHandler.show_the_rest``).
    """

    def __init__(self, queue: Any, handle: Callable[[EpochRecord, str | None], None],
                 on_failure: Callable[[str], None] = lambda what: None) -> None:
        """``queue``: the run channel's events queue (``workers.loop.channel``)."""
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
                event = self.queue.get(timeout=0.2)
                if not isinstance(event, EpochEvent):
                    self._note(event)
                    continue
            except Empty:
                if self._done.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001 - the queue is gone (Ray shut down): not W&B's
                return
            try:
                self.handle(event.record, event.staged)
            except Exception as exc:  # noqa: BLE001 - logged and summarised, never fatal
                self.errors.append(f"epoch {event.record.get('epoch')}: "
                                   f"{type(exc).__name__}: {exc}")
                print(f"warning: W&B logging failed: {self.errors[-1]}", file=sys.stderr)

    def _note(self, event: Event) -> None:
        """The controller's news other than a record."""
        match event:
            case ControllerStarted(handle):
                self.controller = handle
            case UserErrorEvent(message):
                self.user_error = self.user_error or message
            case WorkerFailed(what):
                self.on_failure(what)
            case Preempted(path):
                self.preempted = path or "saved"


def stop_training(controller: Any, guard: Any) -> None:
    """Stop a fit that is still running (interrupted, or waiting for lost workers), then Ray.
    The controller goes first (its workers, actors it owns, go with it), so that the thread
    blocked in ``fit`` returns before Ray shuts down under it; a save in flight is cut short,
    which its atomic writes make a checkpoint directory without metadata.json: never used."""
    import ray

    if controller is not None:
        try:
            kill_train_controller(controller)
        except Exception:  # noqa: BLE001 - the queue is gone (Ray shut down): not W&B's
            pass
        guard.wait_for_fit(timeout=30)
    # Without its handle (stopped before the first report), the controller goes with Ray:
    # a local Ray goes entirely; on a cluster, the actors this driver owns die with it.
    ray.shutdown()


@dataclass(frozen=True)
class RayTrain:
    """What the driver's loop (``training.driver.train_and_record``) asks of Ray: ``build`` a
    trainer (``build_trainer``'s arguments; its ``fit()`` blocks until the run ends, raising
    what Ray raises), open the run's ``channel`` (``open_channel``), see the cluster's
    ``room`` now (``watchdog.room_now``), and ``stop`` a fit still running (``stop_training``).
    A unit test passes a scripted twin whose ``fit()`` sends the controller's events and
    raises as Ray would, so the driver's failure, restart, interrupt and grace paths are
    proven without a cluster."""

    build: Callable[..., Any] = build_trainer
    channel: Callable[[], Any] = open_channel
    room: Callable[[], dict[str, float]] = room_now
    stop: Callable[[Any, Any], None] = stop_training


RAY_TRAIN = RayTrain()  # Ray itself
