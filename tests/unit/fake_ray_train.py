"""A scripted twin of what the driver's loop asks of Ray (``training.ray_trainer.RayTrain``),
for the unit tier: no Ray runs.

- the run's channel: in-process queues used as ``workers.loop.channel.Stream`` is (``get``
  raises Ray's ``Empty``), every item pickled on its way, as the channel actor pickles it;
- the trainer: its ``fit()`` plays a script of what Ray Train would do, in the fit thread
  that ``SignalGuard.run`` starts: the reports and worker faults the controller hands its
  callbacks (through the real ``RunRecorder``, so the history on disk and the typed events
  are the controller's own), signals to this process, waits for the driver's stop request,
  and what ``fit()`` raises (``ray.train.TrainingFailedError``, a ``RayActorError``);
- the cluster's room (a node lost: none);
- the stop of a fit still running: recorded, and it ends the script as killing the Ray Train
  controller ends a fit.
"""

from __future__ import annotations

import os
import pickle
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from orchestrator.training.ray_trainer import RayTrain
from orchestrator.training.recorder import RunRecorder
from tests.unit.run_files import epoch_metrics, write_checkpoint_dir
from workers.contract.names import PREEMPT_KEY

CONTROLLER = "the controller's actor handle"  # what ControllerStarted carries here
WAIT_S = 20.0  # at most, for what the driver is to do next (a test fails rather than hangs)


class Stream:
    """One named queue of the run's channel."""

    def __init__(self) -> None:
        self.items: queue.Queue[Any] = queue.Queue()
        self.sent: list[Any] = []  # everything put, in order
        self._lock = threading.Lock()
        self._idle = threading.Event()  # the reader came back for more, and there was none

    def put(self, item: Any) -> None:
        item = pickle.loads(pickle.dumps(item))  # it crosses processes through an actor
        with self._lock:
            self._idle.clear()
            self.sent.append(item)
            self.items.put(item)

    def settled(self) -> None:
        """Wait until the reader has dealt with everything put so far."""
        assert self._idle.wait(WAIT_S), "the driver took no more events"

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        from ray.util.queue import Empty

        with self._lock:
            if self.items.empty():
                self._idle.set()
        try:
            return self.items.get(block, timeout)
        except queue.Empty:
            raise Empty from None


class Channel:
    def __init__(self) -> None:
        self.streams: dict[str, Stream] = {}
        self.closed = False

    def __call__(self, name: str) -> Stream:
        return self.streams.setdefault(name, Stream())

    def close(self) -> None:
        self.closed = True


Step = Callable[["Fit"], None]


class Fit:
    """One ``fit()`` as it goes: the controller's recorder, the run directory, the driver's
    stop requests, and whether the driver stopped it."""

    def __init__(self, ray: ScriptedRay, run_dir: str, events: Any, stop_requests: Any,
                 log_model: str) -> None:
        self.ray, self.run_dir, self.stop_requests = ray, Path(run_dir), stop_requests
        self.events = events
        self.recorder = RunRecorder(run_dir, log_model, events)  # as build_trainer adds it

    def __call__(self) -> None:
        for step in self.ray.script:
            if self.ray.stopped.is_set():  # the controller was killed: nothing more happens
                return
            step(self)


class ScriptedRay:
    """``ScriptedRay(script).ray_train``: the ``RayTrain`` a unit test passes to
    ``train_and_record``. ``built``: the arguments the driver built its trainer with."""

    def __init__(self, script: list[Step], room: float = 64.0) -> None:
        self.script = script
        self.channel = Channel()
        self.built: dict[str, Any] = {}
        self.room = {"CPU": room, "GPU": 0.0}
        self.stops: list[Any] = []  # the controller handle of each stop the driver made
        self.stopped = threading.Event()
        self.ray_train = RayTrain(build=self.build, channel=lambda: self.channel,
                                  room=lambda: dict(self.room), stop=self.stop)

    def build(self, cfg: Any, run_dir: str, use_gpu: bool, **options: Any) -> Any:
        self.built = {"cfg": cfg, "run_dir": run_dir, "use_gpu": use_gpu, **options}
        return SimpleNamespace(fit=Fit(self, run_dir, options["events"],
                                       options["stop_requests"], options["log_model"]))

    def stop(self, controller: Any, guard: Any) -> None:
        self.stops.append(controller)
        self.stopped.set()
        guard.wait_for_fit(timeout=WAIT_S)


# The steps of a script.

def report(epoch: int, val_loss: float, *, best: bool = False, saved: bool = False,
           workers: int = 2, **extra: Any) -> Step:
    """Every rank's ``ray.train.report`` of an epoch, rank 0's metrics first; ``saved``: with
    a checkpoint (written as the workers write one, no test split to score)."""
    def step(fit: Fit) -> None:
        checkpoint = (write_checkpoint_dir(fit.run_dir, epoch, val_loss, is_best=best,
                                           test_split=False, workers=workers, **extra)
                      if saved else None)
        metrics = {**epoch_metrics(epoch, val_loss), "workers": workers, "is_best": best,
                   "epoch_seconds": 0.5, **extra}
        fit.recorder.after_report(None, [metrics] * workers,
                                  SimpleNamespace(path=str(checkpoint)) if checkpoint else None)
    return step


def fault(exc: BaseException, rank: int = 0) -> Step:
    """The worker group failed (the controller's ``after_exception``); Ray Train then
    restarts it while ``failure.max_failures`` allows: the script goes on with the reports
    from the latest checkpoint, or raises what ``fit()`` raises."""
    return lambda fit: fit.recorder.after_exception(None, {rank: exc})


def fails(exc: BaseException) -> Step:
    """``fit()`` raises ``exc``."""
    def step(fit: Fit) -> None:
        raise exc
    return step


def send(signum: int) -> Step:
    """A signal to this process (the driver's), as Ctrl-C or ``kill`` sends it, once the
    driver has shown what came before (a real signal comes seconds after the last event)."""
    def step(fit: Fit) -> None:
        fit.events.settled()
        os.kill(os.getpid(), signum)
    return step


def stop_requested() -> Step:
    """Rank 0's preempt thread hears the driver ask for the step in flight to be saved."""
    return lambda fit: fit.stop_requests.get(timeout=WAIT_S)


def preempted(epoch: int, step: int) -> Step:
    """The workers saved the step in flight (a resume checkpoint, no record) and return."""
    def saved(fit: Fit) -> None:
        path = fit.run_dir / f"checkpoint_step{step:08d}_preempt"
        fit.recorder.after_report(None, [{"epoch": epoch, "global_step": step,
                                          PREEMPT_KEY: 1.0}], SimpleNamespace(path=str(path)))
    return saved


def node_lost() -> Step:
    """The cluster has no room for the workers from now on."""
    def lose(fit: Fit) -> None:
        fit.ray.room = {"CPU": 0.0, "GPU": 0.0}
    return lose


def hangs() -> Step:
    """Ray Train waits (for room, for a retry) until the driver stops it."""
    return lambda fit: fit.ray.stopped.wait(WAIT_S)
