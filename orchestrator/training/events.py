"""What the Ray Train controller tells the driver while a run goes: one small frozen type per
kind of news. ``controller.recorder.RunRecorder`` sends them through the run channel's events
stream (``workers.loop.channel``); ``training.ray_trainer.EventPump`` takes them on the driver.

They cross from the controller's process to the driver's through the channel actor, so they
pickle by reference to this module: it imports nothing beyond the standard library (no torch,
no Ray), and both processes import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.contract.records import EpochRecord


@dataclass(frozen=True)
class EpochEvent:
    """An epoch's (or an evaluation's) record, as the history holds it."""

    record: EpochRecord
    staged: str | None = None  # the model the recorder set aside for W&B, if it is one to log


@dataclass(frozen=True)
class ControllerStarted:
    """The controller's own actor handle, sent once before its first other news: the driver
    may have to stop this controller (``ray_trainer.stop_training``)."""

    handle: Any


@dataclass(frozen=True)
class UserErrorEvent:
    """A worker's user error (one line): never retried, the driver stops the run."""

    message: str


@dataclass(frozen=True)
class WorkerFailed:
    """A fault's one line (``worker <rank>: Type: message``): Ray may restart the workers."""

    what: str


@dataclass(frozen=True)
class Preempted:
    """The workers saved the step in flight, as the driver asked after a signal."""

    path: str | None  # that resume checkpoint's directory (None: Ray persisted none)


Event = EpochEvent | ControllerStarted | UserErrorEvent | WorkerFailed | Preempted
