"""A Learner workload's splits scored in one process, through fastai's own loaders and loop.

A Learner's DataLoaders are its splits: ``dls.loaders[0]`` train, ``[1]`` valid and, if
present, ``[2]`` the test split (fastai's ``ds_idx=2``; users add it with
``dls.loaders.append(dls.test_dl(test_df, with_labels=True))``). Their datasets alone cannot
be scored with a torch DataLoader: fastai's loaders make the batches (a tabular loader reads
rows by ``iloc`` and yields ``(cats, conts, target)``; item and batch transforms such as
normalisation run in the loader). So a split is scored as the engine scores validation: a
fastai validation pass over the split's loader, the loss and the workload's mergeable metrics
collected as sufficient statistics per batch, every row once (unshuffled, nothing dropped).
"""

from __future__ import annotations

from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.torch_core import find_bs

from workers.evaluation.metrics import MeanLoss, pack_states, unpack_compute
from workers.loop.precision import as_float32, autocast

SPLIT_LOADERS = {"train": 0, "val": 1, "test": 2}  # the split's index in learn.dls.loaders


def split_loader(learn: Learner, split: str, batch_size: int | None = None) -> Any | None:
    """The split's DataLoader, unshuffled and with the last partial batch kept (a test_dl is
    already so; any other loader is made so); None if the Learner has no such loader."""
    loaders = learn.dls.loaders
    index = SPLIT_LOADERS[split]
    if index >= len(loaders) or loaders[index] is None:
        return None
    dl = loaders[index]
    if not hasattr(dl, "new"):  # a plain torch DataLoader: taken as it is
        return dl
    bs = batch_size or dl.bs
    return dl.new(bs=bs, shuffle=False, drop_last=False)


class SplitStats(Callback):
    """The loss (weighted by batch size) and the metrics' states of one validation pass, as
    the engine's ``ReportToRay`` collects them; nothing is all-reduced here."""

    def __init__(self, metrics: list[Any]) -> None:
        self.metrics_stats, self.total = metrics, MeanLoss()

    def before_validate(self) -> None:
        self.total.reset()
        for metric in self.metrics_stats:
            metric.reset()

    def after_batch(self) -> None:
        if len(self.yb) == 0:
            return
        self.total.add_batch(self.loss.item(), find_bs(self.yb))
        for metric in self.metrics_stats:
            metric.update(self.pred, *self.yb)


def evaluate_learner_split(learn: Learner, split: str, metrics: list[Any], *, batch_size: int,
                           device: torch.device, precision: str = "fp32"
                           ) -> dict[str, float] | None:
    """``{split}_loss`` and ``{split}_<metric>`` over the whole split with the Learner's
    current weights; None if the Learner has no loader for the split. ``metrics``: the
    workload's mergeable metrics (``learner.mergeable_metrics``)."""
    import fastai.callback.progress  # noqa: F401 - registers Learner.no_bar

    dl = split_loader(learn, split, batch_size)
    if dl is None:
        return None
    if hasattr(dl, "to"):
        dl.to(device)
    learn.model.to(device)  # validate() runs no before_fit, which would move it
    stats = SplitStats(metrics)
    cbs: list[Callback] = [stats]
    if precision == "bf16":
        cbs.append(Bf16Autocast(device))
    # The Learner's own metrics are left out of the pass: a torchmetrics metric wrapped by
    # fastai is the very object behind one of ``metrics``, and would be updated twice.
    own, learn.metrics = learn.metrics, []
    try:
        with learn.no_bar():
            learn.validate(dl=dl, cbs=cbs)
    finally:
        learn.metrics = own
    vector, sizes = pack_states(stats.total, metrics)  # one process: nothing to all-reduce
    return unpack_compute(split, vector, sizes, stats.total, metrics)


class Bf16Autocast(Callback):
    """bf16 mixed precision for a Learner on any device: the forward pass and loss under
    autocast, the predictions in float32 for the loss and metrics. (fastai's MixedPrecision
    enters CUDA autocast only, which leaves a CPU run in float32.)"""

    order = 10  # as fastai's MixedPrecision: before the metrics read the predictions

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.context: torch.autocast | None = None  # entered for the batch

    def before_batch(self) -> None:
        self.context = autocast(self.device, "bf16")
        self.context.__enter__()

    def after_pred(self) -> None:
        self.learn.pred = as_float32(self.pred)

    def after_loss(self) -> None:
        self._leave()

    def after_cancel_batch(self) -> None:
        self._leave()

    def _leave(self) -> None:
        if self.context is not None:
            self.context.__exit__(None, None, None)
            self.context = None
