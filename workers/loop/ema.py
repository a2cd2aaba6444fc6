"""``train.ema_decay``: an exponential moving average of the weights, kept like the model.

Under ``ddp`` each rank averages its whole model (identical on every rank: DDP keeps the
parameters identical); under ``fsdp`` each rank averages only its own shard of every
parameter (the local tensor of each DTensor), so the EMA costs 1/N of the model per rank and
is never gathered, except when a save reads it whole. The update is torch's own
(``torch.optim.swa_utils.get_ema_multi_avg_fn``: one ``torch._foreach_lerp_`` over the
tensors), after every optimizer step. Floating-point buffers (BatchNorm's running
statistics) are averaged too, as ``AveragedModel(use_buffers=True)`` does; integer ones
(``num_batches_tracked``) are the model's own.

The EMA is evaluated in the model itself (``swapped``): the same forward, the same sharding,
the same exact evaluation path as the raw weights, with no second module to keep in step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter or buffer: a DTensor's local shard (a view of the
    memory FSDP gathers from and the optimizer updates), else the tensor itself."""
    if _is_dtensor(tensor):
        dtensor: Any = tensor
        return dtensor.to_local().detach()
    return tensor.detach()


class WeightsEma:
    """The EMA of ``model``'s floating-point state (parameters and persistent buffers), on
    this rank: whole under ddp, this rank's shards under fsdp (``model`` sharded in place)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self._average = get_ema_multi_avg_fn(decay)
        # The state dict's tensors, each once (tied weights share one EMA), in its order.
        self.names: list[str] = []
        self.tracked: list[torch.Tensor] = []  # the model's parameters and buffers
        seen: set[int] = set()
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in seen or not torch.is_floating_point(tensor):
                continue
            seen.add(id(tensor))
            self.names.append(name)
            self.tracked.append(tensor)
        with torch.no_grad():
            self.shadow = [t.clone() for t in self._live()]
        self.updates = 0

    def _live(self) -> list[torch.Tensor]:
        return [_local(t) for t in self.tracked]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average, after an optimizer step (no collective)."""
        if self.shadow:
            self._average(self.shadow, self._live(), self.updates)
        self.updates += 1

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The model holding the EMA inside, the raw weights back after. What the model's
        buffers became meanwhile (an evaluation's broadcast of rank 0's) the EMA keeps: the
        EMA evaluated is the one rank 0 saves, on every rank."""
        live = self._live()
        with torch.no_grad():
            raw = [t.clone() for t in live]
            torch._foreach_copy_(live, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.shadow, live)
                torch._foreach_copy_(live, raw)

    # -- the whole EMA, for a save and a restart -----------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """The EMA as the model's state dict (names, order, integer buffers the model's own):
        under ddp the EMA's own tensors (a save copies them at once); under fsdp gathered
        whole into rank 0's host memory, a collective every rank makes (others get {})."""
        ema = {id(t): s for t, s in zip(self.tracked, self.shadow, strict=True)}
        state = self.model.state_dict(keep_vars=True)
        sharded = any(_is_dtensor(t) for t in self.tracked)
        out: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            value = ema.get(id(tensor), tensor)
            if _is_dtensor(tensor):
                value = _whole(tensor, value)
            out[name] = value.detach()
        if not sharded:
            return out
        import torch.distributed as dist

        return {k: v.cpu() for k, v in out.items()} if dist.get_rank() == 0 else {}

    def state_dict(self) -> dict[str, Any]:
        """What a resume checkpoint keeps (``CheckpointManager.extras``): the whole EMA and
        its number of updates; under fsdp a collective, whole on rank 0 only."""
        return {"weights": self.weights(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A saved EMA (whole, as ``state_dict`` gives it) into this rank's: its shards under
        fsdp, cut locally (every rank read the checkpoint), whatever the number of ranks that
        saved it."""
        weights = state["weights"]
        with torch.no_grad():
            for name, tracked, shadow in zip(self.names, self.tracked, self.shadow,
                                             strict=True):
                whole = weights[name].to(shadow.device, shadow.dtype)
                shadow.copy_(_shard_like(tracked, whole) if _is_dtensor(tracked) else whole)
        self.updates = int(state.get("updates", 0))


def _whole(like: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's whole value from each rank's ``local`` part (a collective)."""
    from torch.distributed.tensor import DTensor

    dtensor: Any = like
    return DTensor.from_local(local, dtensor.device_mesh, dtensor.placements, run_check=False,
                              shape=dtensor.shape, stride=dtensor.stride()).full_tensor()


def _shard_like(like: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole``, sharded as ``like`` is (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    dtensor: Any = like
    return distribute_tensor(whole, dtensor.device_mesh, dtensor.placements,
                             src_data_rank=None).to_local()


class EmaState:
    """The EMA as a ``workers.checkpoint.state.ModelState``: a save of the EMA's weights (when
    they won), with the run's optimizer read through the raw weights' reader ``raw``."""

    def __init__(self, ema: WeightsEma, raw: Any) -> None:
        self.ema, self.raw, self.collective = ema, raw, raw.collective

    def weights(self) -> dict[str, torch.Tensor]:
        return self.ema.weights()

    def optimizer_state(self, optimizer: Any = None) -> dict[str, Any] | None:
        return self.raw.optimizer_state(optimizer)
