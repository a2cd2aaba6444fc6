"""The benchmark's workload: an MLP of a chosen size on data generated from a seed.

The monitored metric is ``val_scheduled_loss``: a metric object (the project's metric
protocol, see ``workers.evaluation.metrics``) whose value follows a fixed schedule, so that the same
epochs improve in every variant and every run, whatever the weights do. The real
``val_loss`` and ``val_accuracy`` are computed and reported as usual; only the tracker's
decisions are pinned. With 10 epochs the schedule improves in epochs 1, 2, 3, 5 and 8.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

# One value per epoch, cycled; each cycle is 1.0 lower than the previous one, so that runs
# longer than 10 epochs keep the same pattern (the first epoch of a cycle improves).
SCHEDULE = (1.0, 0.8, 0.7, 0.75, 0.6, 0.65, 0.62, 0.5, 0.55, 0.52)
MONITOR = "val_scheduled_loss"

SIZES = {
    # Ray's fixed per-epoch costs dominate: about 50k weights (0.2 MB).
    "small": {"dim": 32, "hidden": 192, "depth": 1, "n_train": 8192, "n_val": 2048},
    # Serialization dominates: 26.9M float32 weights (108 MB).
    "large": {"dim": 256, "hidden": 2560, "depth": 4, "n_train": 512, "n_val": 256},
}
NUM_CLASSES = 10


def scheduled_value(epoch: int) -> float:
    """The monitored value at ``epoch`` (numbered from 1)."""
    cycle, index = divmod(epoch - 1, len(SCHEDULE))
    return SCHEDULE[index] - float(cycle)


def improving_epochs(epochs: int) -> list[int]:
    """The epochs in which a ``min`` tracker (min_delta 0) sees an improvement."""
    best, out = float("inf"), []
    for epoch in range(1, epochs + 1):
        value = scheduled_value(epoch)
        if value < best:
            best = value
            out.append(epoch)
    return out


class ScheduledLoss:
    """A validation "metric" that reports ``scheduled_value(epoch)``.

    The loop calls ``reset()`` once before each validation pass, so the number of resets is
    the epoch (counted in this process: a benchmark device, not resume-aware). The state is
    ``[ranks, sum of epochs]`` summed across ranks, so every rank computes the same value.
    """

    name = "scheduled_loss"

    def __init__(self) -> None:
        self.evaluations = 0

    def reset(self) -> None:
        self.evaluations += 1

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        pass

    def state(self) -> torch.Tensor:
        return torch.tensor([1.0, float(self.evaluations)], dtype=torch.float64)

    def compute(self, state: torch.Tensor) -> float:
        ranks, total = state.tolist()
        return scheduled_value(round(total / ranks))


def mlp(dim: int, hidden: int, depth: int) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = [torch.nn.Linear(dim, hidden), torch.nn.ReLU()]
    for _ in range(depth):
        layers += [torch.nn.Linear(hidden, hidden), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(hidden, NUM_CLASSES))
    return torch.nn.Sequential(*layers)


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _teacher_data(n: int, dim: int, gen: torch.Generator) -> torch.utils.data.TensorDataset:
    x = torch.randn(n, dim, generator=gen)
    teacher = torch.randn(dim, NUM_CLASSES, generator=torch.Generator().manual_seed(7))
    y = (x @ teacher + 0.5 * torch.randn(n, NUM_CLASSES, generator=gen)).argmax(dim=1)
    return torch.utils.data.TensorDataset(x, y)


def build(size: str = "small", data_seed: int = 0) -> SimpleNamespace:
    """``size``: a key of ``SIZES``. The weights come from the run's seed (set by the loop)."""
    p = SIZES[size]
    gen = torch.Generator().manual_seed(data_seed)
    return SimpleNamespace(
        model=mlp(p["dim"], p["hidden"], p["depth"]),
        train_dataset=_teacher_data(p["n_train"], p["dim"], gen),
        val_dataset=_teacher_data(p["n_val"], p["dim"], gen),
        test_dataset=None,
        loss_fn=torch.nn.functional.cross_entropy,
        metrics=["accuracy", ScheduledLoss()],
    )
