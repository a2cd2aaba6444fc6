"""What making every rank evaluate rank 0's buffers costs: ``broadcast_buffers`` per epoch,
beside the one all-reduce of metric statistics every epoch already does.

    .venv/bin/python -m bench.buffer_sync [--repeats 50]

Two real gloo processes on this machine; models with BatchNorm (torchvision's ResNet-18 and
ResNet-50, built untrained: no download). Prints the median time per call.
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
from workers.evaluation.collectives import all_reduce_sum, broadcast_buffers


def models() -> dict[str, torch.nn.Module]:
    from torchvision.models import resnet18, resnet50

    return {"resnet18": resnet18(), "resnet50": resnet50()}


def _worker(rank: int, port: int, repeats: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        stats = torch.zeros(16, dtype=torch.float64)  # a metric state's size
        rows = {}
        for name, model in models().items():
            n = sum(b.numel() for b in model.buffers())
            timings = {"broadcast_buffers": [], "metric all-reduce": []}
            for _ in range(repeats):
                for what in timings:
                    dist.barrier()
                    started = time.perf_counter()
                    if what == "broadcast_buffers":
                        broadcast_buffers(model)
                    else:
                        all_reduce_sum(stats, torch.device("cpu"))
                    timings[what].append(time.perf_counter() - started)
            rows[name] = (n, {k: statistics.median(v) for k, v in timings.items()})
        if rank == 0:
            out.update(rows)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(free_port(), args.repeats, out), nprocs=2, join=True)
        rows = dict(out)
    table = Table(title=f"Per epoch, 2 gloo processes, median of {args.repeats}")
    for column in ("model", "buffer elements", "broadcast_buffers ms", "metric all-reduce ms",
                   "ratio"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, (n, t) in rows.items():
        table.add_row(name, f"{n:,}", f"{t['broadcast_buffers'] * 1e3:.3f}",
                      f"{t['metric all-reduce'] * 1e3:.3f}",
                      f"{t['broadcast_buffers'] / t['metric all-reduce']:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
