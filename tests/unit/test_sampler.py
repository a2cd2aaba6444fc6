"""Where the training data stream stands mid-epoch, and the record keyed by it: an epoch's
permutation continued after ``consumed`` positions trains every remaining sample once,
whatever the new number of ranks; records and checkpoints are ordered by (epoch, global
step); an evaluation clock counts optimizer steps."""

from __future__ import annotations

from collections import Counter

import pytest
from torch.utils.data import DistributedSampler

from orchestrator.results.epochs import merge_history
from orchestrator.results.summary import repair_history
from workers.contract.names import point, where
from workers.engines.torch_engine import Clock
from workers.loop.sampler import EpochSampler, epoch_permutation, rest_of_epoch


@pytest.mark.parametrize(("size", "world"), [(96, 2), (97, 2), (10, 3), (5, 8)])
def test_a_whole_epoch_is_what_distributed_sampler_gives(size, world):
    for rank in range(world):
        ours = EpochSampler(size, rank, world, seed=3)
        ours.set_epoch(4)
        theirs = DistributedSampler(range(size), num_replicas=world, rank=rank, seed=3)
        theirs.set_epoch(4)
        assert list(ours) == list(theirs) and len(ours) == len(theirs)


@pytest.mark.parametrize(("before", "after", "batches"), [(2, 2, 3), (2, 3, 2), (3, 2, 1),
                                                          (2, 1, 4), (4, 3, 1)])
def test_a_resumed_epoch_trains_each_remaining_sample_once_on_any_number_of_ranks(
        before, after, batches):
    size, batch, seed, epoch = 96, 4, 0, 2
    first = [EpochSampler(size, r, before, seed) for r in range(before)]
    for stream in first:
        stream.set_epoch(epoch)
    trained = [i for s in first for i in s.indices()[:batches * batch]]
    consumed = first[0].position_after(batches, batch)
    assert sorted(trained) == sorted(epoch_permutation(size, seed, epoch)[:consumed])
    rest = [i for r in range(after) for i in rest_of_epoch(size, seed, epoch, consumed, r, after)]
    counts = Counter(trained + rest)
    padding = (-(size - consumed)) % after  # to give every rank as many batches
    assert set(counts) == set(range(size))  # none skipped
    assert sum(counts.values()) == size + padding and max(counts.values()) <= 2
    assert all(counts[i] == 1 for i in trained)  # none of the trained ones again


def test_the_end_of_an_epoch_leaves_nothing():
    stream = EpochSampler(10, 0, 2, 0)
    stream.set_epoch(1, consumed=10)
    assert list(stream) == [] and len(stream) == 0
    assert stream.position_after(batches=3, batch_size=4) == 10


def test_the_clock_evaluates_every_n_steps_and_at_the_last():
    clock = Clock(global_step=0, total=10, every=4)
    ticks = []
    for _ in range(10):
        clock.global_step += 1
        ticks.append(clock.evaluates(epoch_ends=False))
    assert [i + 1 for i, t in enumerate(ticks) if t] == [4, 8, 10]
    assert clock.evaluation(epoch=1) == 3 and clock.done
    by_epoch = Clock(global_step=5, total=10, every=None)
    assert by_epoch.evaluates(epoch_ends=True) and not by_epoch.evaluates(epoch_ends=False)
    assert by_epoch.evaluation(epoch=2) == 2


def record(epoch, global_step=None, **extra):
    out = {"epoch": epoch, **extra}
    if global_step is not None:
        out.update(step=global_step % 6, global_step=global_step)
    return out


def test_records_are_ordered_and_replaced_by_their_point():
    history = [record(1, 4), record(1, 6), record(2, 8), record(2, 12)]
    # A restart from the checkpoint at step 8 evaluates at step 10: later records go.
    merged = merge_history(history, record(2, 10, val_loss=0.5))
    assert [point(r) for r in merged] == [(1, 4), (1, 6), (2, 8), (2, 10)]
    # Epoch-only records (the fastai engine, a loop) keep their old order.
    assert [r["epoch"] for r in merge_history([record(1), record(2), record(3)], record(2))] \
        == [1, 2]
    assert where(record(2, 10), by_steps=True) == "epoch 2, step 4 (global step 10)"
    assert where(record(2, 10), by_steps=False) == "epoch 2"


def test_a_preempted_steps_checkpoint_is_not_an_evaluation_of_the_record():
    kept = [{"epoch": 1, "path": "/r/checkpoint_step00000004_1", "is_best": True,
             "metadata": {**record(1, 4), "val_loss": 0.5, "saved_because": "best"}},
            {"epoch": 1, "path": "/r/checkpoint_step00000005_preempt_2", "is_best": False,
             "metadata": {**record(1, 5), "saved_because": "preempt"}}]
    history, changed = repair_history([], kept)
    assert [point(r) for r in history] == [(1, 4)] and changed
