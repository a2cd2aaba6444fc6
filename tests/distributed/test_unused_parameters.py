"""``scaling.find_unused_parameters`` in two real gloo processes (no Ray):

- ``auto``'s first-step probe (``sharding.find_unused``) finds the workload's never-called head
  and not its frozen layer, leaves the model as it was (BatchNorm's running statistics, no
  gradients), and is the same decision on both ranks, also when only one rank's step leaves a
  parameter without a gradient; a model that uses every parameter is not flagged;
- DDP with the flag it decides trains the LayerDrop model (ranks skipping different blocks)
  with identical weights on both ranks;
- with the flag off, DDP's error becomes one line naming the setting and the parameters.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from tests.distributed.ranks import in_ranks
from tests.workloads.unused_params import build
from workers.loop.batches import Batches
from workers.loop.loaders import shard
from workers.loop.sharding import find_unused, loss_probe, unused_parameters_error
from workers.loop.training import train_epoch

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
CPU = torch.device("cpu")


def worker_of(rank: int, setting: Any = "auto") -> SimpleNamespace:
    """The parts of a ``runtime.Worker`` that ``find_unused`` reads."""
    cfg = SimpleNamespace(seed=0, scaling=SimpleNamespace(find_unused_parameters=setting))
    return SimpleNamespace(cfg=cfg, rank=rank, is_rank_zero=rank == 0, device=CPU,
                           restored=SimpleNamespace(start_epoch=1))


class SkipsOnRankOne(torch.nn.Module):
    """Every parameter used, except ``extra`` on rank 1."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.body, self.extra = torch.nn.Linear(8, 3), torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return h if self.rank == 1 else self.extra(h)


def probe_of(workload: Any, rank: int) -> Any:
    loader = DataLoader(shard(workload.train_dataset, rank, WORLD_SIZE), batch_size=16)
    return loss_probe(Batches.of(workload), lambda: next(iter(loader)))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rank_cases(rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    out: dict[str, Any] = {}
    torch.manual_seed(0)
    workload = build(layerdrop=0.5)
    model = workload.model
    before = weights(model)
    out["auto"] = find_unused(model, worker_of(rank), probe_of(workload, rank))
    out["unchanged"] = all(torch.equal(before[k], v) for k, v in weights(model).items())
    out["no_grads"] = all(p.grad is None for p in model.parameters())
    out["training"] = model.training

    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    out["all_used"] = find_unused(plain, worker_of(rank), probe_of(workload, rank))
    one_rank = SkipsOnRankOne(rank)
    out["one_rank"] = find_unused(one_rank, worker_of(rank), probe_of(workload, rank))
    out["setting_true"] = find_unused(plain, worker_of(rank, True), None)
    out["no_probe"] = find_unused(plain, worker_of(rank), None)

    # The LayerDrop model trains under DDP with the flag auto chose (ranks draw differently).
    torch.manual_seed(100 + rank)
    ddp = DistributedDataParallel(model, find_unused_parameters=out["auto"])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = DataLoader(shard(workload.train_dataset, rank, WORLD_SIZE), batch_size=16)
    for _ in range(2):
        train_epoch(ddp, loader, workload.loss_fn, optimizer, CPU)
    out["trained"] = {k: v for k, v in weights(model).items() if "running" not in k}
    out["frozen_kept"] = torch.equal(before["frozen.weight"], model.frozen.weight)

    # Off: DDP's error on the next step, as the engines' one line.
    torch.manual_seed(0)
    static = build(layerdrop=0.0).model
    off = DistributedDataParallel(static, find_unused_parameters=False)
    try:
        train_epoch(off, loader, workload.loss_fn, torch.optim.SGD(static.parameters(), lr=0.1),
                    CPU)
        out["off"] = None
    except RuntimeError as exc:
        error = unused_parameters_error(exc, static)
        out["off"] = str(error) if error is not None else f"other: {exc}"
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return in_ranks(rank_cases, tmp_path_factory.mktemp("unused"), WORLD_SIZE, timeout=120)


def test_auto_finds_the_unused_head_and_leaves_the_model_as_it_was(ranks: Any) -> None:
    for out in ranks:
        assert out["auto"] is True
        assert out["unchanged"] and out["no_grads"] and out["training"]


def test_auto_is_one_decision_for_all_ranks(ranks: Any) -> None:
    assert [out["all_used"] for out in ranks] == [False, False]
    assert [out["one_rank"] for out in ranks] == [True, True]  # only rank 1 skipped one
    assert [out["setting_true"] for out in ranks] == [True, True]
    assert [out["no_probe"] for out in ranks] == [False, False]


def test_layerdrop_trains_with_identical_weights_and_frozen_layer(ranks: Any) -> None:
    a, b = ranks[0]["trained"], ranks[1]["trained"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert ranks[0]["frozen_kept"] and ranks[1]["frozen_kept"]


def test_find_unused_off_fails_in_one_line_naming_the_setting(ranks: Any) -> None:
    for out in ranks:
        line = out["off"]
        assert line is not None and "\n" not in line, line
        assert "scaling.find_unused_parameters: true" in line
        assert "aux_head.weight" in line and "frozen" not in line
