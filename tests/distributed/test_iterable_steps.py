"""Two real gloo processes (no Ray) train a DDP model on a stream (an ``IterableDataset``)
whose shares are uneven: 97 items, so rank 0's share holds 49 (13 batches of 4, the last of
one item) and rank 1's 48 (12 batches). The engine's ``TrainStream`` makes the ranks agree
before every optimizer step: both make the same number of steps (DDP's all-reduce would
otherwise wait forever), with grad_accum_steps 1, 3 and 5, and every item but the one left
over is trained once, on one rank."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from tests.distributed.ranks import in_ranks
from workers.loop.iterable import RankShare, TrainStream
from workers.loop.optim import Stepper
from workers.loop.training import train_steps

pytestmark = pytest.mark.distributed

WORLD_SIZE, N, BATCH, EPOCHS = 2, 97, 4, 2
ACCUMS = (1, 3, 5)
CPU = torch.device("cpu")


class Items(IterableDataset):
    """(features, class) of item i, i = 0..N-1, in a seeded order per epoch; feature 0 is i."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(self.epoch))
        for i in order.tolist():
            yield torch.tensor([float(i), float(i % 7), 1.0]), torch.tensor(i % 2)


class Noting(torch.nn.Module):
    """A linear model noting the items each training forward takes (feature 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.extend(x[:, 0].long().tolist())
        return self.linear(x)


def train_case(rank: int, accum: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    plain = Noting()
    model = DistributedDataParallel(plain)
    stepper = Stepper(torch.optim.SGD(model.parameters(), lr=1e-3), accum=accum)
    share = RankShare(Items(), rank, WORLD_SIZE, BATCH)
    stream = TrainStream(DataLoader(share, batch_size=BATCH), share, CPU)
    trained: list[list[int]] = []
    steps: list[int] = []
    for epoch in range(1, EPOCHS + 1):
        stream.set_epoch(epoch)
        plain.seen = []
        steps.append(sum(1 for _ in train_steps(model, stream, torch.nn.functional.cross_entropy,
                                                stepper, CPU)))
        trained.append(list(plain.seen))
    return {"steps": steps, "trained": trained, "ended": stream.ended,
            "weights": plain.linear.weight.detach().clone()}


def every_accum(rank: int) -> dict[int, Any]:
    return {accum: train_case(rank, accum) for accum in ACCUMS}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[int, Any]]:
    return in_ranks(every_accum, tmp_path_factory.mktemp("iterable"), WORLD_SIZE)


@pytest.mark.parametrize("accum", ACCUMS)
def test_ranks_with_uneven_shares_make_the_same_steps(results, accum):
    first, second = (r[accum] for r in results)
    batches = 12  # the shorter share's, which every rank stops at
    assert first["steps"] == second["steps"] == [-(-batches // accum)] * EPOCHS
    assert first["ended"] and second["ended"]
    assert torch.equal(first["weights"], second["weights"])
    for epoch in range(EPOCHS):
        trained = first["trained"][epoch] + second["trained"][epoch]
        assert len(trained) == len(set(trained)) == N - 1  # rank 0's last item left out
        order = torch.randperm(N, generator=torch.Generator().manual_seed(epoch + 1)).tolist()
        assert set(range(N)) - set(trained) == {order[-1]}  # the stream's last: rank 0's 49th
