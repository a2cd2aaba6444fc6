"""What ``train.ema_decay`` costs: the second evaluation (the EMA's weights scored exactly
beside the raw ones) and the EMA's update after every optimizer step.

    .venv/bin/python -m bench.ema [--repeats 7] [--hidden 1024] [--val 2048]

Two real gloo processes on this machine, under ddp and under fsdp, an MLP with BatchNorm, the
engine's exact evaluation (rank 0's buffers broadcast, each rank's strided validation share,
one all-reduce): an evaluation of the raw weights alone against the raw and the EMA's (swapped
into the model, ``workers.loop.ema``), and an optimizer step (Adam, batch 64 per rank) without
and with ``WeightsEma.update``; each pair measured side by side, alternating, median of
``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.native import free_port
from workers.evaluation.collectives import broadcast_buffers, most_on_any_rank
from workers.evaluation.metrics import build_metrics
from workers.loop.ema import WeightsEma
from workers.loop.loaders import shard
from workers.loop.scoring import accumulate, global_metrics
from workers.loop.sharding import fully_shard_model

CPU = torch.device("cpu")
FEATURES, CLASSES, BATCH = 64, 10, 64


def build(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, CLASSES))


def score(plain: nn.Module, loader: DataLoader, forwards: int, padding: Any) -> dict[str, float]:
    broadcast_buffers(plain)
    metrics = build_metrics(["accuracy"], CLASSES)
    loss = accumulate(plain, loader, nn.functional.cross_entropy, metrics, CPU,
                      forwards=forwards, padding_input=padding)
    plain.train()
    return global_metrics([("val", loss, metrics)], CPU)


def timed(fn: Callable[[], Any]) -> float:
    dist.barrier()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(strategy: str, rank: int, args: argparse.Namespace, val: TensorDataset,
            x: torch.Tensor, y: torch.Tensor) -> tuple[int, dict[str, float]]:
    """One strategy's model, its EMA and the timings (median seconds)."""
    model = build(args.hidden)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if strategy == "fsdp":
        trained = plain = fully_shard_model(model, None, CPU, 2, "fp32")
    else:
        plain, trained = model, nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-3)
    ema = WeightsEma(plain, 0.99)
    loader = DataLoader(shard(val, rank, 2), batch_size=BATCH)
    forwards = most_on_any_rank(len(loader), CPU) if strategy == "fsdp" else 0

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(trained(x), y).backward()
        optimizer.step()

    def raw_only() -> None:
        score(plain, loader, forwards, x)

    def both() -> None:
        score(plain, loader, forwards, x)
        with ema.swapped():
            score(plain, loader, forwards, x)

    def step_with_ema() -> None:
        step()
        ema.update()

    step()  # warm-up (FSDP's lazy init, Adam's state)
    times: dict[str, list[float]] = {k: [] for k in
                                     ("raw", "both", "step", "step+ema", "update")}
    for _ in range(args.repeats):
        times["raw"].append(timed(raw_only))
        times["both"].append(timed(both))
        times["step"].append(timed(step))
        times["step+ema"].append(timed(step_with_ema))
        times["update"].append(timed(ema.update))
    return size, {k: statistics.median(v) for k, v in times.items()}


def _worker(rank: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        g = torch.Generator().manual_seed(1)
        val = TensorDataset(torch.randn(args.val, FEATURES, generator=g),
                            torch.randint(0, CLASSES, (args.val,), generator=g))
        x = torch.randn(BATCH, FEATURES, generator=g)
        y = torch.randint(0, CLASSES, (BATCH,), generator=g)
        rows = {strategy: measure(strategy, rank, args, val, x, y)
                for strategy in ("ddp", "fsdp")}
        if rank == 0:
            out.update(rows)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--val", type=int, default=2048, help="validation samples")
    args = parser.parse_args()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(free_port(), args, out), nprocs=2)
        rows = dict(out)
    table = Table(title=f"train.ema_decay, 2 gloo processes, {args.val} validation samples, "
                        f"median of {args.repeats}")
    for column in ("strategy", "weights", "eval raw s", "eval raw+EMA s", "x",
                   "step s", "step+EMA s", "x", "update ms"):
        table.add_column(column)
    for strategy, (size, t) in rows.items():
        table.add_row(strategy, f"{size / 1e6:.1f} MB", f"{t['raw']:.3f}", f"{t['both']:.3f}",
                      f"{t['both'] / t['raw']:.2f}", f"{t['step']:.4f}",
                      f"{t['step+ema']:.4f}", f"{t['step+ema'] / t['step']:.2f}",
                      f"{t['update'] * 1e3:.2f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
