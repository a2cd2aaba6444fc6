"""Two real gloo processes (no Ray) evaluate shards of one validation set.

Whatever the set size (odd, tiny, smaller than the world), the all-reduced metrics must be
the same on both ranks and equal a single-process evaluation of the whole set.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from workers.evaluation.metrics import build_metrics
from workers.loop.loaders import shard
from workers.loop.scoring import accumulate, evaluate_dataset, global_metrics

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
NUM_CLASSES = 10
NUM_FEATURES = 12
METRICS = ["accuracy", "f1_macro", "mcc"]
KEYS = ["val_loss", "val_accuracy", "val_f1_macro", "val_mcc"]
CPU = torch.device("cpu")

# (set size, batch size): the batch size divides neither shard of the larger sets, and with
# one sample rank 1 gets nothing at all.
CASES = {"n101": (101, 16), "n7": (7, 3), "n1": (1, 4)}


def model_and_data(n: int) -> tuple[torch.nn.Module, TensorDataset]:
    """The same model and data in every process (fixed seeds)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(NUM_FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, NUM_CLASSES)
    )
    gen = torch.Generator().manual_seed(1000 + n)
    x = torch.randn(n, NUM_FEATURES, generator=gen)  # (N, F)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)  # (N,)
    return model, TensorDataset(x, y)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, port: int, n: int, batch_size: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        model, dataset = model_and_data(n)
        metrics = build_metrics(METRICS, NUM_CLASSES)
        part = shard(dataset, rank, WORLD_SIZE)
        loader = DataLoader(part, batch_size=batch_size, shuffle=False)
        loss = accumulate(model, loader, torch.nn.functional.cross_entropy, metrics, CPU)
        local_count = loss.state()[1].item()
        values = global_metrics([("val", loss, metrics)], CPU)
    finally:
        dist.destroy_process_group()
    out = {"metrics": values, "shard_size": len(part), "local_count": local_count}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


def run_two_ranks(n: int, batch_size: int, out_dir: Path) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=rank_main, args=(rank, port, n, batch_size, str(out_dir)))
        for rank in range(WORLD_SIZE)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * WORLD_SIZE, "a rank failed (see its stderr)"
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def single_process(n: int, batch_size: int, rank: int | None = None) -> dict[str, float]:
    """One process, the whole set (or one rank's shard of it)."""
    model, dataset = model_and_data(n)
    if rank is not None:
        dataset = shard(dataset, rank, WORLD_SIZE)
    return evaluate_dataset(
        model, dataset, torch.nn.functional.cross_entropy, build_metrics(METRICS, NUM_CLASSES),
        split="val", batch_size=batch_size, device=CPU,
    )


@pytest.mark.parametrize("case", list(CASES))
def test_global_metrics_equal_a_single_process_evaluation(tmp_path: Path, case: str) -> None:
    n, batch_size = CASES[case]
    ranks = run_two_ranks(n, batch_size, tmp_path)

    # Every sample once: strided shards, no padding, nothing dropped.
    assert [r["shard_size"] for r in ranks] == [(n + 1) // 2, n // 2]
    assert [r["local_count"] for r in ranks] == [(n + 1) // 2, n // 2]

    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # identical, not merely close
    got = ranks[0]["metrics"]
    assert list(got) == KEYS
    want = single_process(n, batch_size)
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12), key


def test_a_naive_mean_of_rank_means_would_be_wrong() -> None:
    """Guards the test above: on 101 samples, averaging per-rank values gives another answer."""
    n, batch_size = CASES["n101"]
    true = single_process(n, batch_size)
    per_rank = [single_process(n, batch_size, rank) for rank in range(WORLD_SIZE)]
    for key in KEYS:
        naive = sum(r[key] for r in per_rank) / WORLD_SIZE
        # At least ten times the tolerance the test above allows (the loss is off by ~4e-5).
        assert naive != pytest.approx(true[key], rel=1e-5), key
