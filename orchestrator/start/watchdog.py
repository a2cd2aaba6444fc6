"""A run whose workers were lost (their node gone) waits, inside Ray, for room to start them
again: Ray Train retries quietly. The driver says so once a minute, in one line, and stops
the run after ``failure.worker_wait_s`` (then ``--resume`` continues it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SAY_EVERY_S = 60.0
CHECK_EVERY_S = 2.0


class WorkersLost(Exception):
    """The cluster had no room for the run's workers for ``failure.worker_wait_s``."""


@dataclass
class Waiting:
    """Pure bookkeeping of one wait: when it began and when it was last reported."""

    limit_s: float
    since: float | None = None
    said: float | None = None

    def update(self, now: float, room: bool) -> str:
        """``ok`` (room for the workers), ``say`` (a line is due), ``wait`` or ``give_up``."""
        if room:
            self.since = self.said = None
            return "ok"
        if self.since is None:
            self.since = now
        if now - self.since >= self.limit_s:
            return "give_up"
        if self.said is None or now - self.said >= SAY_EVERY_S:
            self.said = now
            return "say"
        return "wait"


def room_now() -> dict[str, float]:
    """CPUs and GPUs of the cluster's nodes alive now."""
    import ray

    total: dict[str, float] = {"CPU": 0.0, "GPU": 0.0}
    for node in ray.nodes():
        if node.get("Alive"):
            for key in total:
                total[key] += float(node.get("Resources", {}).get(key, 0.0))
    return total


class Watchdog:
    def __init__(self, need: dict[str, float], limit_s: float, say: Callable[[str], None],
                 room: Callable[[], dict[str, float]] = room_now) -> None:
        self.need = {k: v for k, v in need.items() if v}
        self.say, self.room = say, room
        self.waiting = Waiting(limit_s)
        self.next_check = 0.0
        self.since = ""  # the wall-clock time the current wait began

    def tick(self) -> None:
        """Called often by the waiting driver; looks at the cluster every few seconds."""
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + CHECK_EVERY_S
        have = self.room()
        was_waiting = self.waiting.since is not None
        action = self.waiting.update(now, all(have.get(k, 0.0) >= v
                                              for k, v in self.need.items()))
        if action == "ok":
            return
        if not was_waiting:
            self.since = time.strftime("%H:%M:%S")
        wanted = ", ".join(f"{v:g} {k}" for k, v in self.need.items())
        has = ", ".join(f"{have.get(k, 0.0):g} {k}" for k in self.need)
        limit = f"failure.worker_wait_s={self.waiting.limit_s:g}"
        if action == "say":
            self.say(f"waiting since {self.since} for room for the workers ({wanted}); the "
                     f"cluster has {has} now; the run stops after {limit} s")
        elif action == "give_up":
            raise WorkersLost(f"the cluster had no room for the run's workers ({wanted} "
                              f"needed, {has} there; a node lost?) for {limit} s")


def needs(cfg: Any, use_gpu: bool) -> dict[str, float]:
    n = cfg.scaling.min_workers  # an elastic run continues on its minimum
    return {"CPU": n * cfg.scaling.cpus_per_worker, "GPU": float(n) if use_gpu else 0.0}
