"""The run's one small actor between the driver and Ray Train: named queues on it, one for
the controller's events to the driver (each record, a worker's failure, a user error), one
for the driver's stop request to the workers (``loop.preempt``). One actor process for both
instead of one ``ray.util.queue.Queue`` actor each (every Ray actor is a Python process that
imports Ray: about a CPU-second at each start).

A ``Stream`` is used as that queue is here: ``put(item)``, and ``get(timeout=...)`` that
raises ``ray.util.queue.Empty`` when nothing came. It pickles as the actor's handle and a
name, so it travels in the trainer's config and callbacks to the controller and workers.
"""

from __future__ import annotations

import asyncio
from typing import Any


class _Channel:
    """The actor: an asyncio queue per name, made on first use."""

    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue] = {}

    def _queue(self, name: str) -> asyncio.Queue:
        return self._queues.setdefault(name, asyncio.Queue())

    async def put(self, name: str, item: Any) -> None:
        self._queue(name).put_nowait(item)

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


def open_channel() -> Any:
    """A channel actor on the driver's node, as Ray Train places its controller: a node lost
    elsewhere must not take the run's record stream (or its stop requests) with it. Returns
    a function of a name that gives its ``Stream``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(_Channel).options(num_cpus=0, scheduling_strategy=here).remote()
    return lambda name: Stream(actor, name)
