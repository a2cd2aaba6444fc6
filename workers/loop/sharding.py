"""``scaling.strategy``: how the model is spread over the ranks, and how its whole state is
read back for a checkpoint.

- ``ddp``: every rank holds the whole model (DDP averages the gradients); rank 0 reads its own
  copy, the other ranks take no part in a save.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``), each rank holds a shard of every
  parameter and of the optimizer state. A save gathers the whole state dict into rank 0's
  host memory; every rank takes part, so all of them must know that rank 0 decided to save
  (the checkpoint manager broadcasts the decision first) and none gathers otherwise.

``wrap_ddp`` applies ``scaling.find_unused_parameters`` wherever a model is DDP-wrapped: DDP
syncs each gradient bucket once every parameter in it has a gradient, so a parameter that a
step leaves without one (an unused head, LayerDrop) stalls its bucket and the next step fails,
unless DDP looks for such parameters after each forward (``find_unused_parameters=True``, a
walk of the autograd graph per step).
"""

from __future__ import annotations

import itertools
import logging
import random
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

from workers.contract.user_errors import UserInputError
from workers.evaluation.collectives import all_reduce_sum
from workers.loop.batches import Batches
from workers.loop.devices import model_device, to_device
from workers.loop.precision import forward_loss


class LocalState:
    """DDP (or one rank): rank 0's own module and optimizer are the whole state. A
    ``workers.checkpoint.state.ModelState``, no collective."""

    collective = False

    def __init__(self, model: nn.Module, optimizer: Any) -> None:
        self.model, self.optimizer = model, optimizer

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def optimizer_state(self, optimizer: Any = None) -> dict[str, Any] | None:
        """The state of ``optimizer`` (default: the run's; None when there is none)."""
        optimizer = optimizer if optimizer is not None else self.optimizer
        return None if optimizer is None else optimizer.state_dict()


class ShardedState:
    """FSDP: a ``workers.checkpoint.state.ModelState`` whose every call is a collective (every
    rank must make it, in the same order); the whole state lands in rank 0's host memory, the
    other ranks get nothing."""

    collective = True

    def __init__(self, model: nn.Module, optimizer: Any) -> None:
        self.model, self.optimizer = model, optimizer

    @staticmethod
    def _options() -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def weights(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        # full_state_dict: plain tensors (no ShardedTensor or DTensor)
        return cast(dict[str, torch.Tensor],
                    get_model_state_dict(self.model, options=self._options()))

    def optimizer_state(self, optimizer: Any = None) -> dict[str, Any] | None:
        """The whole state of ``optimizer`` (default: the run's; None when there is none:
        a custom loop keeps its optimizers itself)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer = optimizer if optimizer is not None else self.optimizer
        if optimizer is None:
            return None
        return get_optimizer_state_dict(self.model, optimizer, options=self._options())


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


def _parts(module: nn.Module) -> list[nn.Module]:
    """The children of ``module`` with parameters, a ``ModuleList`` or ``ModuleDict`` (which has
    no forward of its own, so FSDP cannot gather it as a unit) replaced by its own."""
    parts = []
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            parts.extend(_parts(child))
        elif _has_parameters(child):
            parts.append(child)
    return parts


def shard_units(model: nn.Module, block_classes: Sequence[str] | None) -> list[nn.Module]:
    """The modules sharded as units (each one all-gathered as a whole in its forward), inner
    before outer: every module whose class is named in ``block_classes``, or by default the
    children with parameters of the first module, from the top, that has more than one (a
    wrapper around one network is looked through; a ``ModuleList``'s blocks are children)."""
    if not block_classes:
        module = model
        while True:
            children = _parts(module)
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


# --- ddp: scaling.find_unused_parameters ------------------------------------------------------

Probe = Callable[[nn.Module], torch.Tensor]  # one training step's loss on one batch

# DDP's error when a step left a parameter without a gradient and it was not looking for such
# (the reducer's, torch 2.14), and the lines in it that list them, by name (with
# TORCH_DISTRIBUTED_DEBUG=INFO or DETAIL) or by index among the parameters that train.
DDP_UNUSED_MESSAGE = "Expected to have finished reduction in the prior iteration"
_UNUSED_NAMES = re.compile(r"Parameters which did not receive grad for rank (\d+): ([^\n]+)")
_UNUSED_INDICES = re.compile(r"Parameter indices which did not receive grad for rank (\d+): "
                             r"([\d ]+)")
NAMES_SHOWN = 4


class UnusedParametersError(UserInputError):
    """A DDP step left parameters without a gradient and DDP was not looking for them."""


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters a step may train, in DDP's order (frozen ones never count)."""
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def unused_parameters(module: nn.Module, probe: Probe, seed: int | None = None) -> list[str]:
    """Names of the trainable parameters of ``module`` that a forward and backward of the
    first batch (``probe``: its forward and loss on a batch, then backward here) leaves
    without a gradient, in eval mode: a step of the module's own training would be seen by
    the user's code (a model counting its training forwards, recording its samples, updating
    state of its own), where an eval forward is what every evaluation makes anyway. So it
    finds what is unused whatever the randomness (an unused head, a branch never taken);
    what only training skips at random (LayerDrop) surfaces as DDP's error, which
    ``unused_parameters_named`` turns into one line naming the setting. The module is left
    as it was: its buffers restored, no gradients, its train/eval mode; the RNGs too
    (``seed``: torch's for the forward, e.g. the first epoch's)."""
    params = trainable(module)
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    was_training = module.training
    device = model_device(module)
    python_rng = random.getstate()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            module.eval()
            for _, p in params:
                p.grad = None
            probe(module).backward()
            return [name for name, p in params if p.grad is None]
    finally:
        random.setstate(python_rng)
        module.train(was_training)
        with torch.no_grad():
            for _, p in params:
                p.grad = None
            for buffer, saved in buffers:
                buffer.copy_(saved)


def loss_probe(batches: Batches, batch: Callable[[], Any], precision: str = "fp32") -> Probe:
    """A probe for ``unused_parameters``: the workload's loss (``batches``) on ``batch()``, as
    the engine's training step computes it."""
    def probe(model: nn.Module) -> torch.Tensor:
        device = model_device(model)
        x, y = batches.split(batch())
        _, loss = forward_loss(model, batches, to_device(x, device), to_device(y, device),
                               device, precision)
        return loss

    return probe


def learner_probe(learn: Any) -> Probe:
    """A probe for a fastai ``Learner``: its loss on a batch of its training DataLoader."""
    def probe(model: nn.Module) -> torch.Tensor:
        dl = learn.dls.train
        rng: Any = getattr(dl, "rng", None)  # its shuffles' and augmentations' draws, kept
        state = rng.getstate() if isinstance(rng, random.Random) else None
        batch = to_device(tuple(dl.one_batch()), model_device(model))
        if state is not None:
            rng.setstate(state)
            dl.rng = rng
        n_inp = learn.dls.n_inp
        return learn.loss_func(model(*batch[:n_inp]), *batch[n_inp:])

    return probe


def loader_first_batch(loader: Any) -> Any:
    """The first batch ``loader`` (map-style, with a sampler) would give, without iterating it
    (no worker processes started, the sampler's position untouched)."""
    indices = itertools.islice(iter(loader.sampler), loader.batch_size)
    return loader.collate_fn([loader.dataset[i] for i in indices])


def find_unused(module: nn.Module, worker: Any, probe: Probe | None) -> bool:
    """``scaling.find_unused_parameters`` decided for ``module``; ``auto``: whether the first
    training step (``probe``) left a trainable parameter without a gradient on any rank (every
    rank probes and takes part in one all-reduce). Without a probe (a module a custom loop
    prepares itself) auto is false: the error DDP raises then is ``unused_parameters_named``'s
    one line."""
    setting = worker.cfg.scaling.find_unused_parameters
    if setting != "auto":
        return bool(setting)
    if probe is None:
        return False
    seed = None
    if hasattr(worker, "restored"):  # the first epoch's seed: the draws of its first step
        from workers.loop.runtime import epoch_seed

        seed = epoch_seed(worker.cfg.seed, worker.rank, worker.restored.start_epoch)
    try:
        names = unused_parameters(module, probe, seed)
    except Exception:  # training raises it again, with the engine's own line
        logging.getLogger(__name__).debug("find_unused_parameters probe failed", exc_info=True)
        names = []
    found = all_reduce_sum(torch.tensor([float(bool(names))], dtype=torch.float64),
                           worker.device)
    if not float(found[0]):
        return False
    if worker.is_rank_zero:
        shown = ", ".join(names[:NAMES_SHOWN]) + (", ..." if len(names) > NAMES_SHOWN else "")
        logging.getLogger(__name__).warning(
            "scaling.find_unused_parameters: auto: the first training step left %s without a "
            "gradient; DDP looks for unused parameters every step", f"{len(names)} "
            f"parameter(s) ({shown})" if names else "parameters on another rank")
    return True


def wrap_ddp(module: nn.Module, worker: Any, probe: Probe | None = None) -> nn.Module:
    """``module`` prepared by Ray Train on this rank's device: DDP-wrapped when there is more
    than one rank, with ``scaling.find_unused_parameters`` applied (``find_unused``).
    ``worker``: a ``runtime.Worker`` (its config, rank, device, ``parallel_strategy``)."""
    import ray.train.torch

    if worker.one_process:  # one rank and no Ray Train worker: nothing to wrap
        return module.to(worker.device)
    strategy = worker.parallel_strategy
    kwargs = ({"find_unused_parameters": find_unused(module, worker, probe)}
              if strategy == "ddp" else None)
    return ray.train.torch.prepare_model(module, parallel_strategy=strategy,
                                         parallel_strategy_kwargs=kwargs)


def unused_parameters_error(exc: BaseException,
                            module: nn.Module | None) -> UnusedParametersError | None:
    """DDP's unused-parameter error as one line naming the setting (and the parameters DDP
    lists; ``module``, the one DDP wrapped, names those it gives by index); None for any other
    error."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or DDP_UNUSED_MESSAGE not in text:
        return None
    named = _UNUSED_NAMES.search(text)
    if named:
        rank, names = named.group(1), [n.strip() for n in named.group(2).split(",")]
    else:
        indexed = _UNUSED_INDICES.search(text)
        rank = indexed.group(1) if indexed else "?"
        params = trainable(module) if module is not None else []
        names = [params[int(i)][0] for i in (indexed.group(2).split() if indexed else [])
                 if int(i) < len(params)]
    shown = ", ".join(names[:NAMES_SHOWN]) + (", ..." if len(names) > NAMES_SHOWN else "")
    return UnusedParametersError(
        "scaling.find_unused_parameters: a training step left parameters without a gradient"
        + (f" ({shown} on rank {rank})" if names else "") + ", and DDP was not looking for "
        "them (an unused head, LayerDrop, a branch some steps skip); set "
        "scaling.find_unused_parameters: true")


@contextmanager
def unused_parameters_named(module: nn.Module) -> Iterator[None]:
    """Training under it: DDP's unused-parameter error becomes ``unused_parameters_error``'s
    line (``module``: the unwrapped model, whose parameter names it gives)."""
    try:
        yield
    except RuntimeError as exc:
        error = unused_parameters_error(exc, module)
        if error is None:
            raise
        raise error from None
