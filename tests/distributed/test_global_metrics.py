"""Two real gloo processes (no Ray) evaluate shards of one validation set.

Whatever the set size (odd, tiny, smaller than the world), the all-reduced metrics must be
the same on both ranks and equal a single-process evaluation of the whole set.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.distributed.ranks import in_ranks
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


def evaluate_shard(rank: int, n: int, batch_size: int) -> dict:
    """This rank's shard of the n-sample set evaluated, the metrics all-reduced."""
    model, dataset = model_and_data(n)
    metrics = build_metrics(METRICS, NUM_CLASSES)
    part = shard(dataset, rank, WORLD_SIZE)
    loader = DataLoader(part, batch_size=batch_size, shuffle=False)
    loss = accumulate(model, loader, torch.nn.functional.cross_entropy, metrics, CPU)
    local_count = loss.state()[1].item()
    values = global_metrics([("val", loss, metrics)], CPU)
    return {"metrics": values, "shard_size": len(part), "local_count": local_count}


def every_case(rank: int) -> dict[str, dict]:
    """Every set size, one after the other, in one process group (one start of the ranks)."""
    return {case: evaluate_shard(rank, n, batch_size) for case, (n, batch_size) in CASES.items()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict]]:
    return in_ranks(every_case, tmp_path_factory.mktemp("global_metrics"), WORLD_SIZE)


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
def test_global_metrics_equal_a_single_process_evaluation(ranks: list[dict[str, dict]],
                                                           case: str) -> None:
    n, batch_size = CASES[case]
    ranks = [r[case] for r in ranks]

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
