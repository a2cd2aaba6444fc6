"""A stop the driver asks for (SIGTERM or SIGINT, with ``failure.preempt_grace_s``): every
rank finishes the step in flight, the run saves a resume checkpoint of that step, and the
workers return. The driver's request is a ``ray.util.queue.Queue`` that it puts into. Rank 0
asks the queue without waiting (one call in flight at a time, its answer looked at after each
optimizer step, a new one sent at most every ``interval_s``), and every rank learns the answer
at the same step (one broadcast of one flag per optimizer step), so all of them stop at the
same one: the step in flight, or the one after when the answer comes during it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from workers.loop.steps import distributed


class StopRequests:
    def __init__(self, queue: Any, rank: int, device: torch.device,
                 interval_s: float = 0.05) -> None:
        self.queue, self.rank, self.device, self.interval_s = queue, rank, device, interval_s
        self._asked = False
        self._pending: Any = None  # the call to the queue in flight
        self._sent = 0.0
        if queue is not None and rank == 0:
            self._send()

    def _send(self) -> None:
        self._pending, self._sent = self.queue.actor.qsize.remote(), time.monotonic()

    def _look(self) -> None:
        import ray

        ready, _ = ray.wait([self._pending], timeout=0)
        if ready:
            try:
                self._asked = ray.get(ready[0]) > 0
            except Exception:  # noqa: BLE001 - the driver (and its queue) is gone: stop
                self._asked = True
            self._pending = None
        if self._pending is None and not self._asked and \
                time.monotonic() - self._sent >= self.interval_s:
            self._send()

    def asked(self) -> bool:
        """Whether the driver asked the run to stop (the same answer on every rank). Without a
        queue (a Tune trial: the search stops its trials itself) never, and no collective."""
        if self.queue is None:
            return False
        if self.rank == 0 and not self._asked:
            if self._pending is None:
                if time.monotonic() - self._sent >= self.interval_s:
                    self._send()
            else:
                self._look()
        if not distributed():
            return self._asked
        flag = torch.tensor([1 if self._asked else 0], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())
