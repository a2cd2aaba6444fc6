"""torchmetrics metrics under two real gloo processes (no Ray): AUROC and average precision
keep every prediction (cat states). Over uneven, unpadded shards their global values equal
one process computing them over the whole set."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.distributed.ranks import in_ranks
from workers.evaluation.metrics import build_metrics
from workers.loop.loaders import shard
from workers.loop.scoring import accumulate, evaluate_dataset, global_metrics

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
N, BATCH = 101, 16  # shards of 51 and 50, neither a multiple of the batch
CPU = torch.device("cpu")


def workload() -> tuple[torch.nn.Module, TensorDataset]:
    """The same model and data in every process (fixed seeds)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(N, 6, generator=gen)
    y = (x[:, 0] + 0.8 * torch.randn(N, generator=gen) > 0).long()
    return model, TensorDataset(x, y)


def auroc_ranks(rank: int) -> dict[str, float]:
    from torchmetrics.classification import MulticlassAUROC, MulticlassAveragePrecision

    model, dataset = workload()
    metrics = build_metrics({"auroc": MulticlassAUROC(num_classes=2),
                             "ap": MulticlassAveragePrecision(num_classes=2)}, 2)
    loader = DataLoader(shard(dataset, rank, WORLD_SIZE), batch_size=BATCH)
    loss = accumulate(model, loader, torch.nn.functional.cross_entropy, metrics, CPU)
    return global_metrics([("val", loss, metrics)], CPU)


def both_cases(rank: int) -> dict[str, dict[str, float]]:
    """Both tests' evaluations, one after the other, in one process group."""
    return {"auroc": auroc_ranks(rank), "collection": collection_ranks(rank)}


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return in_ranks(both_cases, tmp_path_factory.mktemp("torchmetrics"), WORLD_SIZE)


def test_auroc_and_average_precision_equal_one_process(both: list[dict[str, Any]]) -> None:
    from torchmetrics.classification import MulticlassAUROC, MulticlassAveragePrecision

    ranks = [r["auroc"] for r in both]
    assert ranks[0] == ranks[1]
    assert set(ranks[0]) == {"val_loss", "val_auroc", "val_ap"}

    model, dataset = workload()
    want = evaluate_dataset(model, dataset, torch.nn.functional.cross_entropy,
                            build_metrics({"auroc": MulticlassAUROC(num_classes=2),
                                           "ap": MulticlassAveragePrecision(num_classes=2)}, 2),
                            split="val", batch_size=BATCH, device=CPU)
    for key, value in want.items():
        assert ranks[0][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    # Guard: averaging the two shards' own AUROCs gives another answer on this data.
    x, y = dataset.tensors
    with torch.no_grad():
        logits = model(x)
    per_shard = [MulticlassAUROC(num_classes=2)(logits[r::2], y[r::2]).item() for r in (0, 1)]
    assert sum(per_shard) / 2 != pytest.approx(want["val_auroc"], rel=1e-4)


def collection_metrics() -> list:
    """A MetricCollection with a compute group (accuracy, precision, recall share one state)
    beside a lone member of the metrics mapping."""
    from torchmetrics import MetricCollection
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassAUROC,
        MulticlassPrecision,
        MulticlassRecall,
    )

    group = MetricCollection({"acc": MulticlassAccuracy(2), "prec": MulticlassPrecision(2),
                              "rec": MulticlassRecall(2)}, prefix="cls_", compute_groups=True)
    return build_metrics({"group": group, "auroc": MulticlassAUROC(num_classes=2)}, 2)


def collection_ranks(rank: int) -> dict[str, float]:
    model, dataset = workload()
    metrics = collection_metrics()
    loader = DataLoader(shard(dataset, rank, WORLD_SIZE), batch_size=BATCH)
    values = {}
    for _ in range(2):  # a second evaluation starts from reset states
        loss = accumulate(model, loader, torch.nn.functional.cross_entropy, metrics, CPU)
        values = global_metrics([("val", loss, metrics)], CPU)
    return values


def test_a_metric_collection_with_a_compute_group_equals_one_process(
        both: list[dict[str, Any]]) -> None:
    ranks = [r["collection"] for r in both]
    assert ranks[0] == ranks[1]
    assert set(ranks[0]) == {"val_loss", "val_group_cls_acc", "val_group_cls_prec",
                             "val_group_cls_rec", "val_auroc"}
    model, dataset = workload()
    want = evaluate_dataset(model, dataset, torch.nn.functional.cross_entropy,
                            collection_metrics(), split="val", batch_size=BATCH, device=CPU)
    for key, value in want.items():
        assert ranks[0][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    # Guard: the members differ, so a shared state read as one number would show.
    assert len({round(ranks[0][k], 9) for k in ranks[0] if "group" in k}) > 1
