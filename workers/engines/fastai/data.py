"""fastai's data and optimizer state, made to work on Ray Train ranks (no Ray here).

- ``RankShardDL``: this rank's share of a fastai DataLoader;
- ``PlainOptimizerState``: a Learner's optimizer state in plain types that
  ``torch.load(weights_only=True)`` accepts.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from fastai.data.core import TfmdDL
from fastai.learner import Learner
from fastai.torch_core import to_detach
from fastcore.foundation import L

from workers.compat import attach_fastai_fake_loader
from workers.loop.devices import to_device
from workers.loop.runtime import epoch_seed


class RankShardDL(TfmdDL):
    """This rank's share of a fastai DataLoader's indices; batches are made by that loader.

    The delegation is that of fastai's ``DistributedDL``, which cannot be used here: its module
    needs the ``accelerate`` package to import, and it broadcasts rank 0's order with a CUDA
    tensor (which fails under gloo on CPU). Instead every rank draws the same order from a seed,
    reseeded per epoch so that a resumed run shuffles as an uninterrupted one. Training
    (``pad``) wraps around to equal shard lengths, so every rank runs the same number of DDP
    steps; validation takes strided, unpadded slices (rank r: r, r+W, ...) as
    ``workers.loop.loaders.shard`` does, so every sample counts exactly once.
    """

    def __init__(self, dl: Any, rank: int, world_size: int, *, pad: bool, seed: int) -> None:
        # No TfmdDL.__init__: the wrapped loader keeps its own dataset, transforms and batching.
        self.dl, self.rank, self.world_size = dl, rank, world_size
        self.pad, self.seed, self.epoch = pad, seed, 0
        self.bs, self.drop_last, self.dataset = dl.bs, dl.drop_last, dl.dataset
        self.num_workers, self.offs, self.pin_memory = dl.num_workers, dl.offs, dl.pin_memory
        self.device = dl.device
        attach_fastai_fake_loader(self, like=dl)

    @property
    def n_inp(self) -> int:
        return self.dl.n_inp

    def before_iter(self) -> None:
        self.dl.before_iter()

    def randomize(self) -> None:
        self.dl.randomize()

    def after_batch(self, b: Any) -> Any:
        return self.dl.after_batch(b)

    def after_iter(self) -> None:
        self.dl.after_iter()

    def create_batches(self, samps: Any) -> Any:
        return self.dl.create_batches(samps)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def get_idxs(self) -> list[int]:
        seed = epoch_seed(self.seed, 0, self.epoch)  # the same on all ranks
        self.dl.rng = random.Random(seed)
        # Some loaders draw from numpy's global generator instead (fastai's TabWeightedDL,
        # tabular's default, samples with replacement there): the same draw on every rank too,
        # or each rank would shard its own sample. The caller's numpy state is left as it was.
        outside = np.random.get_state()
        np.random.seed(seed % 2**32)
        try:
            idxs = list(self.dl.get_idxs())
        finally:
            np.random.set_state(outside)
        if self.pad and idxs:
            padded = -(-len(idxs) // self.world_size) * self.world_size
            idxs += (idxs * (padded // len(idxs) + 1))[: padded - len(idxs)]
        return idxs[self.rank :: self.world_size]

    def __len__(self) -> int:
        n, world = self.dl.n, self.world_size
        local = -(-n // world) if self.pad else len(range(self.rank, n, world))
        if self.dl.bs is None:
            return local
        return local // self.dl.bs + (0 if self.dl.drop_last or local % self.dl.bs == 0 else 1)

    def to_detach(self, b: Any, cpu: bool = True, gather: bool = True) -> Any:
        # Under WORLD_SIZE > 1 fastai all-gathers every batch's loss and metrics through this
        # (learn.to_detach): a collective per batch that uneven validation shards would leave
        # waiting forever. The engine computes the global values itself.
        return to_detach(b, cpu, gather=False)


class PlainOptimizerState:
    """``learn.opt``'s state in plain types: fastai keeps hyper-parameters in an ``L`` with
    numpy scalars, which ``torch.load(weights_only=True)`` refuses."""

    def __init__(self, learn: Learner) -> None:
        self.learn = learn

    def state_dict(self) -> dict[str, Any]:
        return _plain(self.learn.opt.state_dict())

    @staticmethod
    def load(learn: Learner, state: dict[str, Any], device: torch.device) -> None:
        if "hypers" in state:  # a fastai Optimizer (not an OptimWrapper around torch's)
            # Unlike torch's, fastai's optimizers do not move loaded state to the parameters'
            # device: the checkpoint's CPU tensors would meet CUDA gradients at the first step.
            state = {"state": to_device(state["state"], device), "hypers": L(state["hypers"])}
        learn.opt.load_state_dict(state)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, (list, L)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
