"""``scaling.strategy``: how the model is spread over the ranks, and how its whole state is
read back for a checkpoint.

- ``ddp``: every rank holds the whole model (DDP averages the gradients); rank 0 reads its own
  copy, the other ranks take no part in a save.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``), each rank holds a shard of every
  parameter and of the optimizer state. A save gathers the whole state dict into rank 0's
  host memory; every rank takes part, so all of them must know that rank 0 decided to save
  (the reporter broadcasts the decision first) and none gathers otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workers.contract.errors import UserInputError


@dataclass
class Gathered:
    """A state dict read already, in the shape ``checkpoint.snapshot`` reads it."""

    state: dict[str, Any]

    def state_dict(self) -> dict[str, Any]:
        return self.state


class LocalState:
    """DDP (or one rank): rank 0's own module and optimizer are the whole state."""

    collective = False

    def __init__(self, model: nn.Module, optimizer: Any) -> None:
        self.model, self.optimizer = model, optimizer

    def weights(self) -> Any:
        return self.model

    def optimizer_state(self) -> Any:
        return self.optimizer


class ShardedState:
    """FSDP: each call is a collective (every rank must make it, in the same order); the whole
    state lands in rank 0's host memory, the other ranks get nothing."""

    collective = True

    def __init__(self, model: nn.Module, optimizer: Any) -> None:
        self.model, self.optimizer = model, optimizer

    @staticmethod
    def _options() -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def weights(self) -> Gathered:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return Gathered(get_model_state_dict(self.model, options=self._options()))

    def optimizer_state(self, optimizer: Any = None) -> Gathered | None:
        """The whole state of ``optimizer`` (default: the run's; None when there is none:
        a custom loop keeps its optimizers itself)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer = optimizer if optimizer is not None else self.optimizer
        if optimizer is None:
            return None
        return Gathered(get_optimizer_state_dict(self.model, optimizer,
                                                 options=self._options()))


def load_full_optimizer_state(model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """A whole optimizer state (as ``ShardedState`` saves it, keyed by parameter name) into a
    sharded model's optimizer: each rank keeps its own shard, whatever the number of ranks
    that saved it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    if any(isinstance(key, int) for key in state.get("state", {})):
        raise UserInputError(
            "scaling.strategy: fsdp cannot continue from a ddp run's optimizer state (its "
            "checkpoint names parameters by position); resume with scaling.strategy: ddp")
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def load_local_optimizer_state(optimizer: Any, state: dict[str, Any]) -> None:
    """A ddp run's optimizer state (parameters by position) into this rank's optimizer."""
    if any(isinstance(key, str) for key in state.get("state", {})):
        raise UserInputError(
            "scaling.strategy: ddp cannot continue from an fsdp run's optimizer state (its "
            "checkpoint names parameters); resume with scaling.strategy: fsdp")
    optimizer.load_state_dict(state)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def shard_units(model: nn.Module, block_classes: Sequence[str] | None) -> list[nn.Module]:
    """The modules sharded as units (each one all-gathered as a whole in its forward), inner
    before outer: every module whose class is named in ``block_classes``, or by default the
    children with parameters of the first module, from the top, that has more than one (a
    wrapper around one network is looked through)."""
    if not block_classes:
        module = model
        while True:
            children = [c for c in module.children() if _has_parameters(c)]
            if len(children) != 1:
                return children
            module = children[0]
    wanted = set(block_classes)
    named = [(name, m) for name, m in model.named_modules()
             if name and type(m).__name__ in wanted]
    missing = wanted - {type(m).__name__ for _, m in named}
    if missing:
        present = sorted({type(m).__name__ for _, m in model.named_modules() if _}) or ["none"]
        raise UserInputError(
            f"scaling.fsdp_blocks: {', '.join(sorted(missing))} not in the model; its module "
            f"classes: {', '.join(present)}")
    named.sort(key=lambda item: item[0].count("."), reverse=True)  # inner first
    return [m for _, m in named if _has_parameters(m)]


def fully_shard_model(model: nn.Module, block_classes: Sequence[str] | None,
                      device: torch.device, world_size: int, precision: str) -> nn.Module:
    """Shard ``model`` in place over all ranks (it becomes an ``FSDPModule``).

    With ``precision: bf16``, FSDP's mixed-precision policy computes in bfloat16 and reduces
    gradients in float32 (the parameters and optimizer state stay float32); batch norms keep
    float32, as their running statistics are float32 (each is then its own unit).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world_size,))
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                      output_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    float32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    units = shard_units(model, block_classes)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and _has_parameters(m)] if precision == "bf16" else []
    for norm in norms:
        fully_shard(norm, mesh=mesh, mp_policy=float32)
    for unit in units:
        if not any(unit is n for n in norms):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
