"""The ``native`` variant: the same data-parallel loop on plain ``torch.distributed``.

Two processes (torch.multiprocessing, gloo), no Ray, no tracker, no checkpointing: the same
workload, seed, sampler, ``train_epoch`` and the same one all-reduce of the metric statistics
as the project's loop. Rank 0 stamps the wall clock when each epoch's global metrics are
known (the point where the Ray variants report) and writes the stamps to a JSON file.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from workers.contract.config import RunConfig
from workers.loop.learner import build_workload
from workers.loop.loaders import shard
from workers.loop.metric_setup import infer_num_classes, workload_metrics
from workers.loop.optim import built_in_optimizer
from workers.loop.runtime import epoch_seed
from workers.loop.scoring import accumulate, global_metrics
from workers.loop.training import train_epoch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, config: dict[str, Any], out: str) -> None:
    # Ray gives each 1-CPU worker one intra-op thread; so does this.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        _train(rank, world_size, RunConfig.model_validate(config), Path(out))
    finally:
        dist.destroy_process_group()


def _train(rank: int, world_size: int, cfg: RunConfig, out: Path) -> None:
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    workload = build_workload(cfg.workload.entrypoint, cfg.workload.params)
    plain = workload.model
    metrics = workload_metrics(workload, infer_num_classes(plain, workload.train_dataset, device))
    model = DistributedDataParallel(plain)
    optimizer = built_in_optimizer(cfg, plain.parameters())
    sampler = DistributedSampler(workload.train_dataset, num_replicas=world_size, rank=rank,
                                 shuffle=True, seed=cfg.seed)
    train_loader = DataLoader(workload.train_dataset, batch_size=cfg.train.batch_size,
                              sampler=sampler)
    val_loader = DataLoader(shard(workload.val_dataset, rank, world_size),
                            batch_size=cfg.train.batch_size, shuffle=False)
    dist.barrier()
    stamps, history = [time.time()], []
    for epoch in range(1, cfg.train.epochs + 1):
        torch.manual_seed(epoch_seed(cfg.seed, rank, epoch))
        sampler.set_epoch(epoch)
        train_loss = train_epoch(model, train_loader, workload.loss_fn, optimizer, device)
        val_loss = accumulate(plain, val_loader, workload.loss_fn, metrics, device)
        values = global_metrics([("train", train_loss, []), ("val", val_loss, metrics)], device)
        stamps.append(time.time())
        history.append({"epoch": epoch, **values})
    if rank == 0:
        out.write_text(json.dumps({"stamps": stamps, "history": history,
                                   "niceness": os.getpriority(os.PRIO_PROCESS, 0)}))


def run_native(config: dict[str, Any], out: Path, world_size: int,
               on_start: Any = None) -> dict[str, Any]:
    """Train in ``world_size`` fresh processes (at this process's niceness, as the Ray
    workers of ``bench.run``); ``on_start(pids)`` is called once they run."""
    env = {"OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the spawned processes
    try:
        ctx = mp.start_processes(
            _worker, args=(world_size, free_port(), config, str(out)),
            nprocs=world_size, join=False, start_method="spawn")
        if on_start is not None:
            on_start([p.pid for p in ctx.processes])
        while not ctx.join():
            pass
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return json.loads(out.read_text())
