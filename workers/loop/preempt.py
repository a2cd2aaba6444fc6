"""A stop the driver asks for (SIGTERM or SIGINT, with ``failure.preempt_grace_s``): every
rank finishes the step in flight, the run saves a resume checkpoint of that step, and the
workers return. The driver's request is a ``ray.util.queue.Queue`` that it puts into; rank 0
looks at it at most once a second, and every rank learns the answer at the same step (one
broadcast of one flag per optimizer step), so all of them stop at the same one.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from workers.loop.steps import distributed


class StopRequests:
    def __init__(self, queue: Any, rank: int, device: torch.device,
                 interval_s: float = 1.0) -> None:
        self.queue, self.rank, self.device, self.interval_s = queue, rank, device, interval_s
        self._looked = time.monotonic()
        self._asked = False

    def asked(self) -> bool:
        """Whether the driver asked the run to stop (the same answer on every rank). Without a
        queue (a Tune trial: the search stops its trials itself) never, and no collective."""
        if self.queue is None:
            return False
        if self.rank == 0 and not self._asked and time.monotonic() - self._looked >= \
                self.interval_s:
            self._looked = time.monotonic()
            try:
                self._asked = not self.queue.empty()
            except Exception:  # noqa: BLE001 - the driver (and its queue) is gone: stop
                self._asked = True
        if not distributed():
            return self._asked
        flag = torch.tensor([1 if self._asked else 0], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())
