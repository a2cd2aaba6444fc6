"""What each rank holds under ``scaling.strategy: ddp`` and ``fsdp``, and what a save costs:

    .venv/bin/python -m bench.fsdp_memory [--size large] [--workers 2] [--repeats 5]

Real gloo processes on this machine, the benchmark's workload (``bench.workload``): after one
training step with Adam, the bytes of parameters and optimizer state in each rank's own
memory (under fsdp, the local shards). Then a save as rank 0 makes it: under ddp, the copy of
its own weights into the reused host image; under fsdp, the gather of the whole state dict
into rank 0's host memory (every rank taking part), then that copy. Prints medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

from bench.native import free_port
from bench.workload import build
from workers.checkpoint.snapshot import HostBuffers
from workers.loop.sharding import ShardedState, fully_shard_model


def local_bytes(obj: object) -> int:
    """Bytes of the tensors in ``obj`` that live in this process (a DTensor's local shard)."""
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(local_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(local_bytes(v) for v in obj)
    return 0


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dim: int) -> None:
    x, y = torch.randn(8, dim), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _worker(rank: int, world: int, port: int, size: str, repeats: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        rows = {}
        for strategy in ("ddp", "fsdp"):
            torch.manual_seed(0)
            workload = build(size)
            model = workload.model
            dim = next(model.parameters()).shape[1]
            if strategy == "fsdp":
                model = fully_shard_model(model, None, torch.device("cpu"), world, "fp32")
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            _step(model, optimizer, dim)
            params = local_bytes(list(model.parameters()))
            optim = local_bytes(optimizer.state_dict()["state"])
            buffers, gather, blocked = HostBuffers(), [], []
            for _ in range(repeats + 1):  # the first allocates the host image
                dist.barrier()
                started = time.perf_counter()
                weights = (ShardedState(model, optimizer).weights()
                           if strategy == "fsdp" else model.state_dict())
                gathered = time.perf_counter()
                if rank == 0:
                    buffers.copy(weights)
                gather.append(gathered - started)
                blocked.append(time.perf_counter() - started)
            sizes = [torch.zeros(2, dtype=torch.int64) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([params, optim]))
            rows[strategy] = {"params": [int(s[0]) for s in sizes],
                              "optim": [int(s[1]) for s in sizes],
                              "gather": statistics.median(gather[1:]),
                              "blocked": statistics.median(blocked[1:])}
        if rank == 0:
            out.update(rows)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(args.workers, free_port(), args.size, args.repeats, out),
                 nprocs=args.workers, join=True)
        rows = dict(out)
    mb = 1e6
    table = Table(title=f"{args.size} model, {args.workers} gloo processes, one Adam step; "
                        f"a save: median of {args.repeats}")
    for column in ("strategy", "params MB / rank", "optimizer MB / rank", "x ddp",
                   "gather ms", "gather + host copy ms", "x gather"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    ddp_total = max(rows["ddp"]["params"]) + max(rows["ddp"]["optim"])
    for strategy, r in rows.items():
        total = max(r["params"]) + max(r["optim"])
        gather = "" if strategy == "ddp" else f"{r['gather'] * 1e3:.1f}"
        ratio = "" if strategy == "ddp" else f"{r['blocked'] / r['gather']:.2f}"
        table.add_row(strategy, " / ".join(f"{b / mb:.1f}" for b in r["params"]),
                      " / ".join(f"{b / mb:.1f}" for b in r["optim"]),
                      f"{total / ddp_total:.3f}", gather, f"{r['blocked'] * 1e3:.1f}", ratio)
    Console().print(table)


if __name__ == "__main__":
    main()
