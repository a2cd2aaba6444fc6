"""A stop the driver asks for (SIGTERM or SIGINT, with ``failure.preempt_grace_s``): every
rank finishes the step in flight, the run saves a resume checkpoint of that step, and the
workers return. The driver's request comes on the run channel's ``stop`` queue
(``loop.channel``). On rank 0 a thread waits on it (a long poll: it returns as soon as the
driver puts), and every rank learns the answer after each optimizer step (one broadcast of
one flag), so all of them stop at the same step: the one in flight.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from workers.evaluation.collectives import distributed


class StopRequests:
    def __init__(self, queue: Any, rank: int, device: torch.device) -> None:
        self.queue, self.rank, self.device = queue, rank, device
        self._asked = threading.Event()
        if queue is not None and rank == 0:
            threading.Thread(target=self._wait, name="stop-requests", daemon=True).start()

    def _wait(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                self.queue.get(block=True, timeout=5)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the driver (and its queue) is gone: stop
                pass
            self._asked.set()
            return

    def asked(self) -> bool:
        """Whether the driver asked the run to stop (the same answer on every rank). Without a
        queue (a Tune trial: the search stops its trials itself) never, and no collective."""
        if self.queue is None:
            return False
        if not distributed():
            return self._asked.is_set()
        flag = torch.tensor([1 if self._asked.is_set() else 0], dtype=torch.int64,
                            device=self.device)
        torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())
