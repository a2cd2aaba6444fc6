"""Two (or more) real gloo processes, spawned, each running one module-level function of its
rank: what every test of this tier does, in one place."""

from __future__ import annotations

import multiprocessing as mp
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, cases: Callable[[int], Any],
               out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        out = cases(rank)
        dist.barrier()  # no rank tears gloo down while another is still in a collective
    finally:
        dist.destroy_process_group()
    torch.save(out, Path(out_dir, f"rank{rank}.pt"))


def in_ranks(cases: Callable[[int], Any], out_dir: Path, world_size: int = 2,
             timeout: float = 180) -> list[Any]:
    """``cases(rank)`` in ``world_size`` spawned processes joined in one gloo group (``cases``:
    a module-level function, or a ``functools.partial`` of one, so that it pickles); each
    rank's result (tensors, numbers, strings, lists and dicts of them), in rank order. A rank
    that fails, or waits past ``timeout`` in a collective the others never make, fails the
    test."""
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, cases, str(out_dir)))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * world_size, "a rank failed or hung (its stderr)"
    return [torch.load(Path(out_dir, f"rank{r}.pt"), weights_only=True)
            for r in range(world_size)]
