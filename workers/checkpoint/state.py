"""How a save reads the model's whole state: the one interface of ``scaling.strategy``'s
two readers, ``workers.loop.sharding.LocalState`` (ddp) and ``ShardedState`` (fsdp).

Both give state dicts, ready for ``checkpoint.snapshot`` to copy into host memory. A
``collective`` reader gathers the state from every rank's shard: every rank must make each
call, in the same order, and only rank 0 gets the whole state.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class ModelState(Protocol):
    # Whether each read is a collective that every rank must make (fsdp); otherwise rank 0
    # reads its own copy and the other ranks take no part in a save (ddp).
    collective: bool

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's state dict (under fsdp: whole, in rank 0's host memory)."""
        ...

    def optimizer_state(self, optimizer: Any = None) -> dict[str, Any] | None:
        """The state dict of ``optimizer`` (default: the run's; None when there is none: a
        custom loop keeps its optimizers itself)."""
        ...
