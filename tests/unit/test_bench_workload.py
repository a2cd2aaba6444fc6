"""The benchmark workload: its sizes, and the fixed schedule of improving epochs."""

from __future__ import annotations

import torch

from bench.workload import (
    SCHEDULE,
    ScheduledLoss,
    build,
    improving_epochs,
    scheduled_value,
    weights_bytes,
)
from workers.decisions.tracker import BestTracker


def test_schedule_improves_in_some_epochs_only():
    assert improving_epochs(10) == [1, 2, 3, 5, 8]
    # Longer runs repeat the pattern, one cycle lower.
    assert improving_epochs(20) == [1, 2, 3, 5, 8, 11, 12, 13, 15, 18]
    assert scheduled_value(11) == SCHEDULE[0] - 1.0


def test_the_projects_tracker_sees_the_same_improvements():
    tracker = BestTracker("val_scheduled_loss", "auto")
    improved = [e for e in range(1, 11)
                if tracker.update(e, {"val_scheduled_loss": scheduled_value(e)}).improved]
    assert improved == improving_epochs(10)


def test_metric_is_the_same_on_every_rank_after_summing_states():
    ranks = [ScheduledLoss(), ScheduledLoss()]
    for epoch in range(1, 4):
        for metric in ranks:
            metric.reset()  # the loop resets once per validation pass
            metric.update(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long))
        summed = ranks[0].state() + ranks[1].state()
        assert [m.compute(summed) for m in ranks] == [scheduled_value(epoch)] * 2


def test_sizes():
    assert weights_bytes(build("small").model) < 1_000_000
    assert weights_bytes(build("large").model) >= 100_000_000
    a, b = build("small"), build("small")
    assert torch.equal(a.train_dataset.tensors[0], b.train_dataset.tensors[0])  # seeded
