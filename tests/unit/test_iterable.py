"""A torch ``IterableDataset`` as a split (no Ray, one process): each rank's share and each
loader worker's part of it (every item once, the same batches whatever the worker count), the
position a resume continues from, the first-batch check and the one-line refusals."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from tests.workloads.iterable import build
from workers.contract.config import RunConfig
from workers.contract.user_errors import UserInputError
from workers.engines.torch_engine import Clock
from workers.loop.batches import Batches
from workers.loop.iterable import RankShare, TrainStream, check_iterable_run, is_iterable
from workers.loop.loaders import first_batch, loader_workers, make_loader, split_of
from workers.loop.metric_setup import infer_num_classes, workload_metrics
from workers.loop.optim import Stepper, make_stepper
from workers.loop.scoring import evaluate_dataset

CPU = torch.device("cpu")


class Numbers(IterableDataset):
    """0, 1, ..., n-1, in an order set by the epoch (``set_epoch``; identity before it)."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.epoch:
            return iter(range(self.n))
        gen = torch.Generator().manual_seed(self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())


def rank_batches(n: int, rank: int, world: int, batch: int, workers: int,
                 start: int = 0, epoch: int = 0) -> list[list[int]]:
    share = RankShare(Numbers(n), rank, world, batch)
    share.set_epoch(epoch, start)
    loader = DataLoader(share, batch_size=batch, num_workers=workers)
    return [b.tolist() for b in loader]


@pytest.mark.parametrize(("n", "world", "batch", "workers"),
                         [(203, 2, 16, 0), (203, 2, 16, 2), (101, 3, 4, 2), (7, 2, 1, 2),
                          (2, 3, 4, 2)])
def test_every_item_once_across_ranks_and_loader_workers(n, world, batch, workers):
    per_rank = [rank_batches(n, r, world, batch, workers) for r in range(world)]
    items = [i for batches in per_rank for b in batches for i in b]
    assert sorted(items) == list(range(n))  # each once, none dropped
    for rank, batches in enumerate(per_rank):
        share = list(range(rank, n, world))
        # The rank's share in the stream's order, cut in consecutive batches: as one process
        # reading it alone would batch it, whatever the number of loader workers.
        assert batches == [share[i:i + batch] for i in range(0, len(share), batch)]


def test_persistent_loader_workers_see_each_epoch_and_start():
    share = RankShare(Numbers(40), 1, 2, 4)
    loader = DataLoader(share, batch_size=4, num_workers=2, persistent_workers=True)
    share.set_epoch(3)
    first = [i for b in loader for i in b.tolist()]
    share.set_epoch(3, 12)
    resumed = [i for b in loader for i in b.tolist()]
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3)).tolist()
    assert first == order[1::2] and resumed == order[12:][1::2]


def stream_of(n: int, rank: int, world: int, batch: int, start: int = 0) -> TrainStream:
    share = RankShare(Numbers(n), rank, world, batch)
    stream = TrainStream(DataLoader(share, batch_size=batch), share, CPU)
    stream.set_epoch(1, start)
    return stream


@pytest.mark.parametrize(("before", "after", "batches"), [(2, 2, 3), (2, 3, 2), (3, 2, 1),
                                                          (1, 2, 5)])
def test_a_resume_skips_exactly_the_items_trained(before, after, batches):
    n, batch = 101, 4
    trained = []
    for rank in range(before):
        taken = list(stream_of(n, rank, before, batch))[:batches]
        trained += [i for b in taken for i in b.tolist()]
    consumed = stream_of(n, 0, before, batch).position_after(batches, batch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    assert sorted(trained) == sorted(order[:consumed])  # the stream's first `consumed` items
    rest = [i for rank in range(after) for b in stream_of(n, rank, after, batch, consumed)
            for i in b.tolist()]
    counts = Counter(trained + rest)
    assert max(counts.values()) == 1  # none trained twice
    assert len(counts) >= n - (after - 1)  # at most one item a rank left out at the end


def test_steps_group_micro_batches_and_the_epoch_end_is_known_at_its_last_step():
    stream = stream_of(10, 0, 1, 2)  # 5 batches
    seen = [(len(b), in_step, last, stream.ended) for b, in_step, last in
            stream.micro_batches(2)]
    assert [(s, last) for _, s, last, _ in seen] == [(2, False), (2, True), (2, False),
                                                     (2, True), (1, True)]
    assert [ended for *_, last, ended in seen if last] == [False, False, True]


def test_an_empty_share_has_no_step():
    stream = stream_of(1, 1, 2, 4)  # rank 1 of 2, one item: none for it
    assert list(stream.micro_batches(1)) == [] and stream.ended


def test_the_first_batch_of_a_stream_and_its_classes():
    workload = build()
    x, y = first_batch(workload.train_dataset, torch.utils.data.default_collate)
    assert x.shape == (1, 8) and y.shape == (1,)
    assert infer_num_classes(workload.model, workload.train_dataset, CPU,
                             Batches.of(workload)) == 3


def test_a_stream_of_bare_tensors_is_refused_naming_its_split():
    workload = build(first_item="tensor")
    batch = first_batch(workload.train_dataset, torch.utils.data.default_collate)
    with pytest.raises(UserInputError, match=r"^workload\.train_dataset: a batch \(tensor\(1, "
                       r"8\)\) is neither an \(input, target\) pair"):
        split_of(Batches.of(workload), batch, "train")
    with pytest.raises(UserInputError, match=r"^workload\.train_dataset: a batch"):
        infer_num_classes(workload.model, workload.train_dataset, CPU, Batches.of(workload))


class Broken(IterableDataset):
    def __iter__(self):
        raise RuntimeError("the shard file is missing")


def test_a_stream_that_fails_or_is_empty_is_blamed_on_its_split():
    collate = torch.utils.data.default_collate
    with pytest.raises(UserInputError, match=r"^workload\.val_dataset: its first sample cannot "
                       r"be read \(RuntimeError: the shard file is missing\)"):
        first_batch(Broken(), collate, "val")
    with pytest.raises(UserInputError, match=r"^workload\.test_dataset: the IterableDataset "
                       "yields no items"):
        first_batch(Numbers(0), collate, "test")


def config(**train) -> RunConfig:
    return RunConfig.model_validate({"workload": {"entrypoint": "m:f"}, "train": train})


@pytest.mark.parametrize("schedule", ["linear", "cosine", "one_cycle", "step"])
def test_a_schedule_over_the_total_steps_needs_max_steps(schedule):
    workload = build()
    with pytest.raises(UserInputError, match=rf"^train\.schedule: {schedule} is laid out over "
                       r"the run's total optimizer steps.*set train\.max_steps"):
        check_iterable_run(config(schedule=schedule), workload)
    check_iterable_run(config(schedule=schedule, max_steps=30), workload)


def test_what_a_stream_without_max_steps_may_use():
    workload = build()
    for train in ({"schedule": "constant", "warmup_steps": 5},
                  {"schedule": "step", "step_size": 10}):
        check_iterable_run(config(**train), workload)
    check_iterable_run(config(schedule="cosine"), SimpleNamespace(
        train_dataset=workload.train_dataset, scheduler=lambda opt, total: None))
    check_iterable_run(config(schedule="cosine"), SimpleNamespace(
        train_dataset=TensorDataset(torch.zeros(2, 1))))  # map-style: sized as ever


def test_an_unsized_schedule_warms_up_then_holds_and_the_clock_has_no_end():
    cfg = config(schedule="constant", warmup_steps=4, lr=0.1)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    stepper = make_stepper(cfg, None, optimizer, None, None)
    stepper.restore(None, 0, None)
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        stepper.scheduler.step()
    assert rates == pytest.approx([0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1])
    seen = {}
    own = make_stepper(cfg, SimpleNamespace(scheduler=lambda opt, total: seen.setdefault(
        "total", total) or torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
                       optimizer, None, None)
    assert isinstance(own, Stepper) and seen == {"total": None}
    clock = Clock(global_step=10**9, total=None, every=None)
    assert not clock.done and not clock.evaluates(False) and clock.evaluates(True)


def test_a_stream_gets_one_loader_worker_and_no_sampler():
    workload = build()
    assert is_iterable(workload.train_dataset) and not is_iterable(TensorDataset(torch.zeros(1)))
    assert loader_workers("auto", workload.train_dataset, 8) == 1
    assert loader_workers(3, workload.train_dataset, 8) == 3
    loader = make_loader(RankShare(workload.val_dataset, 0, 1, 16), 16,
                         torch.utils.data.default_collate, workers=0, device=CPU)
    assert sum(len(y) for _, y in loader) == 101


def test_a_stream_scored_in_one_process_equals_its_tensors_scored():
    workload, tensors = build(), build(iterable_eval=False)
    tensors.model.load_state_dict(workload.model.state_dict())
    scores = []
    for w in (workload, tensors):
        metrics = workload_metrics(w, 3)
        scores.append(evaluate_dataset(w.model, w.test_dataset, w.loss_fn, metrics,
                                       split="test", batch_size=16, device=CPU))
    assert scores[0] == pytest.approx(scores[1], rel=1e-12) and "test_accuracy" in scores[0]
