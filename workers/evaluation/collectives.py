"""The collectives of an evaluation and its decisions: every rank makes each call.

Each is a no-op in one process (or a world of one), so the same code runs in a plain process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    """Whether there are other ranks to agree with."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def most_on_any_rank(count: int, device: torch.device) -> int:
    """The largest ``count`` among the ranks (a sharded model's forwards per evaluation)."""
    if not distributed():
        return count
    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics, or any other) on every rank.

    DDP broadcasts rank 0's buffers before each training forward, but that forward then
    updates each rank's running statistics from its own batch: after an epoch every rank holds
    different buffers, and only rank 0's are saved. Evaluating after this, every rank scores
    its shard with the model rank 0 saves (the parameters are already identical: DDP averages
    the gradients). One broadcast per dtype, the buffers packed into one flat tensor.
    """
    if not distributed():
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for buffer in model.buffers():  # the same order on every rank: the same module tree
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    for (dtype, _), buffers in groups.items():
        wire = torch.uint8 if dtype == torch.bool else dtype  # gloo and NCCL take no bool
        flat = torch.cat([b.detach().reshape(-1).to(wire) for b in buffers])
        dist.broadcast(flat, src=0)
        offset = 0
        for buffer in buffers:
            n = buffer.numel()
            with torch.no_grad():
                buffer.copy_(flat[offset:offset + n].view_as(buffer).to(dtype))
            offset += n


def all_reduce_sum(vector: torch.Tensor, device: torch.device) -> torch.Tensor:
    """SUM across ranks in float64 (on the device for NCCL, which cannot reduce CPU tensors)."""
    if not distributed():
        return vector
    on_device = vector.to(device)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    return on_device.cpu()


def broadcast_flags(flags: list[bool], device: torch.device) -> list[bool]:
    """Rank 0's decisions, made identical on every rank (one broadcast)."""
    if not distributed():
        return flags
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return [bool(v) for v in t.tolist()]
