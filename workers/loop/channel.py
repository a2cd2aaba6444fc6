"""The run's one small actor between the driver and Ray Train: named queues on it, one for
the controller's events to the driver (each record, a worker's failure, a user error), one
for the driver's stop request to the workers (``loop.preempt``). One actor process for both
instead of one ``ray.util.queue.Queue`` actor each (every Ray actor is a Python process that
imports Ray: about a CPU-second at each start).

A ``Stream`` is used as that queue is here: ``put(item)``, and ``get(timeout=...)`` that
raises ``ray.util.queue.Empty`` when nothing came. It pickles as the actor's handle and a
name, so it travels in the trainer's config and callbacks to the controller and workers.

A driver process keeps one channel actor for all its runs (a Python session calling
``train`` again and again): each run's queues have names of their
own, dropped when it ends (``Channel.close``). One actor per run cost a Python process's
start at each run, about 2 CPU-seconds on 2 cores.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any


class _Channel:
    """The actor: an asyncio queue per name ("<run>/<queue>"), made on first use."""

    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue] = {}
        self._closed: set[str] = set()  # runs whose queues are gone

    def _queue(self, name: str) -> asyncio.Queue:
        return self._queues.setdefault(name, asyncio.Queue())

    async def put(self, name: str, item: Any) -> None:
        if name.partition("/")[0] not in self._closed:  # late news of an ended run: dropped
            self._queue(name).put_nowait(item)

    async def close(self, run: str) -> None:
        self._closed.add(run)
        for name in [n for n in self._queues if n.partition("/")[0] == run]:
            del self._queues[name]

    async def ping(self) -> bool:
        return True

    async def get(self, name: str, timeout: float | None) -> tuple[bool, Any]:
        queue = self._queue(name)
        if not queue.empty():  # at once, whatever the timeout (0 included)
            return True, queue.get_nowait()
        try:
            return True, await asyncio.wait_for(queue.get(), timeout)
        except asyncio.TimeoutError:
            return False, None


class Stream:
    """One named queue of a channel actor."""

    def __init__(self, actor: Any, name: str) -> None:
        self.actor, self.name = actor, name

    def put(self, item: Any) -> None:
        import ray

        ray.get(self.actor.put.remote(self.name, item))

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The next item, waiting up to ``timeout`` seconds (None: until one comes)."""
        import ray
        from ray.util.queue import Empty

        found, item = ray.get(self.actor.get.remote(self.name, timeout if block else 0))
        if not found:
            raise Empty
        return item


class Channel:
    """One run's named queues on its driver process's channel actor."""

    def __init__(self, actor: Any) -> None:
        self.actor, self.run = actor, uuid.uuid4().hex

    def __call__(self, name: str) -> Stream:
        return Stream(self.actor, f"{self.run}/{name}")

    def close(self) -> None:
        """Drop this run's queues (whatever is still in them was for this run only)."""
        import ray

        if not ray.is_initialized():  # stopped with the run (ray.get would start a new one)
            return
        try:
            ray.get(self.actor.close.remote(self.run), timeout=30)
        except Exception:  # noqa: BLE001 - Ray already down, or the actor gone with its node
            pass


# This process's channel actor, by the Ray node and job it was made in (a later ray.init,
# even of a new local cluster with the same job id, is on a node of another id).
_actors: dict[tuple[str, str], Any] = {}


def _alive(actor: Any) -> bool:
    import ray

    try:
        return ray.get(actor.ping.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - Ray already down, or the actor gone with its node
        return False


def open_channel() -> Channel:
    """A run's channel: its queues on this process's channel actor, made on the driver's node
    on first use, as Ray Train places its controller (a node lost elsewhere must not take the
    run's record queue, or its stop requests, with it). Returns a ``Channel``: called with a
    name it gives that queue's ``Stream``; ``close()`` when the run has ended."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    context = ray.get_runtime_context()
    key = (context.get_node_id(), context.get_job_id())
    actor = _actors.get(key)
    if actor is None or not _alive(actor):
        here = NodeAffinitySchedulingStrategy(key[0], soft=False)
        actor = ray.remote(_Channel).options(num_cpus=0, scheduling_strategy=here).remote()
        _actors.clear()
        _actors[key] = actor
    return Channel(actor)
