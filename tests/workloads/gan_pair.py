"""A GAN-style pair trained by the workload's own loop (``engine: loop``), two optimizers.

The generator (with BatchNorm: buffers that training updates per rank) learns to draw points
of a ring; the discriminator (with dropout) tells them from real ones. The model the run
keeps is the pair; it is scored as the discriminator (``forward``) on a validation set of real
points (label 1) and points of a fixed wrong distribution (label 0), with ``loss_fn``.
Each report also carries the optimizers' own step counts (``train_steps_g``/``_d``): after a
restart they continue, because both optimizers are kept (``ctx.keep``) in resume checkpoints.
``epoch_seconds``: each epoch also sleeps this long (time for a test to signal mid-run).
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import torch
from torch import nn

NOISE = 4


def ring(n: int, gen: torch.Generator) -> torch.Tensor:
    angle = torch.rand(n, generator=gen) * 2 * math.pi
    radius = 2 + 0.1 * torch.randn(n, generator=gen)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)


class Pair(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(NOISE, hidden), nn.BatchNorm1d(hidden),
                                       nn.ReLU(), nn.Linear(hidden, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, hidden), nn.LeakyReLU(0.2),
                                           nn.Dropout(0.1), nn.Linear(hidden, 1))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.discriminator(points)  # (N, 1): the logit of "real"


def real_or_fake_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), label.float())


def adam_steps(optimizer: torch.optim.Optimizer) -> float:
    states = list(optimizer.state.values())
    return float(states[0]["step"]) if states else 0.0


def loop(ctx) -> None:
    pair = ctx.workload.model
    generator, discriminator = ctx.prepare(pair.generator), ctx.prepare(pair.discriminator)
    lr = ctx.config.train.lr
    opt_g = ctx.keep("opt_g", torch.optim.Adam(pair.generator.parameters(), lr=lr,
                                               betas=(0.5, 0.999)))
    opt_d = ctx.keep("opt_d", torch.optim.Adam(pair.discriminator.parameters(), lr=lr,
                                               betas=(0.5, 0.999)))
    for _epoch in ctx.epochs():
        pair.train()
        for real, _ in ctx.train_loader:
            real = real.to(ctx.device)
            n = len(real)
            fake = generator(torch.randn(n, NOISE, device=ctx.device))
            labels = torch.cat([torch.ones(n), torch.zeros(n)]).to(ctx.device)
            d_loss = real_or_fake_loss(discriminator(torch.cat([real, fake.detach()])), labels)
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            g_loss = real_or_fake_loss(discriminator(fake), torch.ones(n, device=ctx.device))
            opt_g.zero_grad()
            g_loss.backward()
            opt_g.step()
        time.sleep(ctx.workload.epoch_seconds)
        metrics = ctx.evaluate(split="val")
        if ctx.report({**metrics, "train_g_loss": g_loss, "train_d_loss": d_loss,
                       "train_steps_g": adam_steps(opt_g), "train_steps_d": adam_steps(opt_d)}):
            break


def build(n_train: int = 96, n_val: int = 61, hidden: int = 32,
          epoch_seconds: float = 0.0) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(7)
    train = ring(n_train, gen)
    wrong = torch.randn(n_val - n_val // 2, 2, generator=gen) * 0.7  # a blob, not a ring
    val_x = torch.cat([ring(n_val // 2, gen), wrong])
    val_y = torch.cat([torch.ones(n_val // 2, dtype=torch.long),
                       torch.zeros(len(wrong), dtype=torch.long)])
    return SimpleNamespace(
        model=Pair(hidden),
        train_dataset=torch.utils.data.TensorDataset(train, torch.ones(n_train, dtype=torch.long)),
        val_dataset=torch.utils.data.TensorDataset(val_x, val_y),
        test_dataset=torch.utils.data.TensorDataset(val_x.flip(0), val_y.flip(0)),
        loss_fn=real_or_fake_loss,
        metrics=["accuracy"],
        loop=loop,
        epoch_seconds=epoch_seconds,
    )
