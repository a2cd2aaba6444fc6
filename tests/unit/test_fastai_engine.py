"""The fastai engine's parts that need no Ray: sharding, Learner workloads, state, config."""

from __future__ import annotations

import io
import pickle
import random
import subprocess
import sys
from pathlib import Path

import fastai.callback.progress
import fastai.callback.schedule  # noqa: F401 - registers Learner.fit_one_cycle
import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.metrics import F1Score
from fastai.torch_core import find_bs
from pydantic import ValidationError

from orchestrator.start.config_file import format_validation_error, load_config
from tests.payloads import Payload
from tests.workloads.overfit_fastai import build as overfit_learner
from workers.contract.config import RunConfig
from workers.contract.workload import WorkloadError
from workers.engines.fastai.data import PlainOptimizerState, RankShardDL
from workers.loop.learner import AvgMetricStats, build_workload
from workers.loop.scoring import evaluate_dataset

REPO = Path(__file__).resolve().parents[2]


def indices_dl(n: int, bs: int, shuffle: bool, drop_last: bool = False):
    """A fastai loader over 0..n-1, so each batch shows which samples it holds."""
    data = torch.utils.data.TensorDataset(torch.arange(n), torch.zeros(n, dtype=torch.long))
    dls = DataLoaders.from_dsets(data, data, bs=bs, num_workers=0)
    return dls.train.new(shuffle=shuffle, drop_last=drop_last)


def shard_batches(dl, rank: int, world: int, *, pad: bool, epoch: int = 1) -> list[list[int]]:
    shard = RankShardDL(dl, rank, world, pad=pad, seed=0)
    shard.set_epoch(epoch)
    batches = [x.tolist() for x, _ in shard]
    assert len(batches) == len(shard)  # fastai's schedules count on len(dl)
    return batches


@pytest.mark.parametrize("world", [2, 3])
def test_validation_shards_cover_every_sample_exactly_once(world):
    dl = indices_dl(101, bs=8, shuffle=False)
    seen = []
    for rank in range(world):
        samples = sum(shard_batches(dl, rank, world, pad=False), [])
        assert samples == list(range(rank, 101, world))  # strided, as evaluation.shard
        seen += samples
    assert sorted(seen) == list(range(101))


def test_training_shards_are_equal_disjoint_and_reshuffled_each_epoch():
    dl = indices_dl(101, bs=8, shuffle=True)
    epoch1 = [sum(shard_batches(dl, rank, 2, pad=True, epoch=1), []) for rank in range(2)]
    assert len(epoch1[0]) == len(epoch1[1]) == 51  # the same number of DDP steps on each rank
    together = epoch1[0] + epoch1[1]
    assert set(together) == set(range(101)) and len(together) == 102  # one sample wraps around
    again = [sum(shard_batches(dl, rank, 2, pad=True, epoch=1), []) for rank in range(2)]
    assert again == epoch1  # the order depends on the seed and epoch only (resume)
    epoch2 = sum(shard_batches(dl, 0, 2, pad=True, epoch=2), [])
    assert epoch2 != epoch1[0]


def test_a_loader_drawing_from_numpy_is_drawn_the_same_on_every_rank():
    """fastai's tabular default (TabWeightedDL) samples with replacement from numpy's global
    generator: each rank must shard the same draw, or the shards overlap at random."""
    import numpy as np
    import pandas as pd
    from fastai.tabular.all import TabularPandas

    frame = pd.DataFrame({"x": np.arange(101, dtype="float32"), "y": np.zeros(101)})
    dl = TabularPandas(frame, cont_names=["x"], y_names="y").dataloaders(bs=8).train
    assert type(dl).__name__ == "TabWeightedDL"

    def rows(rank: int) -> list[float]:
        np.random.seed(1000 + rank)  # each rank's own numpy state, as in separate processes
        shard = RankShardDL(dl, rank, 2, pad=True, seed=0)
        shard.set_epoch(3)
        idxs = shard.get_idxs()
        assert np.random.randint(10**9) == np.random.RandomState(1000 + rank).randint(10**9)
        return idxs

    draw = RankShardDL(dl, 0, 1, pad=False, seed=0)
    draw.set_epoch(3)
    whole = draw.get_idxs()  # the one draw both ranks shard
    padded = whole + whole[:1]
    assert rows(0) == padded[0::2] and rows(1) == padded[1::2]


def test_drop_last_counts_full_batches_only():
    dl = indices_dl(101, bs=8, shuffle=True, drop_last=True)
    assert [len(b) for b in shard_batches(dl, 1, 2, pad=True)] == [8] * 6


def test_a_learner_workload_scores_as_learn_validate():
    random.seed(0)
    torch.manual_seed(0)
    workload = build_workload("tests.workloads.overfit_fastai:build", {})
    learn = workload.extras["learner"]
    assert workload.model is learn.model and workload.loss_fn is learn.loss_func
    assert workload.test_dataset is learn.dls.loaders[2].dataset
    assert [type(m) for m in workload.metrics] == [AvgMetricStats]
    with learn.no_bar(), learn.no_logging():
        learn.fit(2, lr=2e-3)
        val_loss, accuracy = learn.validate()
    ours = evaluate_dataset(learn.model, workload.val_dataset, workload.loss_fn, workload.metrics,
                            split="val", batch_size=7, device=torch.device("cpu"))
    assert ours["val_loss"] == pytest.approx(val_loss, rel=1e-6)
    assert ours["val_accuracy"] == pytest.approx(accuracy, rel=1e-6)


def test_a_learners_third_loader_is_its_test_split_scored_every_row_once_as_validate():
    from tests.workloads.tabular_fastai import build as tabular_learner
    from workers.loop.learner_splits import evaluate_learner_split, split_loader

    torch.manual_seed(0)
    workload = build_workload("tests.workloads.tabular_fastai:build", {})
    learn = workload.extras["learner"]
    assert workload.test_dataset is learn.dls.loaders[2].dataset  # the metadata's test_split
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, lr=1e-2)  # BatchNorm's running statistics move away from their defaults
        test_loss, test_accuracy = learn.validate(ds_idx=2)
    dl = split_loader(learn, "test", batch_size=7)
    assert (dl.n, dl.bs, dl.shuffle, dl.drop_last) == (57, 7, False, False)
    assert list(dl.get_idxs()) == list(range(57))  # every row once: none padded, none dropped
    assert sum(find_bs(b[-1]) for b in dl) == 57
    ours = evaluate_learner_split(learn, "test", workload.metrics, batch_size=7,
                                  device=torch.device("cpu"))
    assert ours == {"test_loss": pytest.approx(test_loss, rel=1e-6),
                    "test_accuracy": pytest.approx(test_accuracy, rel=1e-6)}
    # A third loader that shuffles and drops its last partial batch is still scored whole.
    learn.dls.loaders[2] = learn.dls.loaders[2].new(shuffle=True, drop_last=True)
    again = evaluate_learner_split(learn, "test", workload.metrics, batch_size=7,
                                   device=torch.device("cpu"))
    assert again == {k: pytest.approx(v, rel=1e-6) for k, v in ours.items()}
    # Without a third loader there is no test split, as a workload without test_dataset.
    workload = build_workload("tests.workloads.tabular_fastai:build", {"test_rows": 0})
    assert len(workload.extras["learner"].dls.loaders) == 2 and workload.test_dataset is None
    assert evaluate_learner_split(tabular_learner(test_rows=0), "test", [], batch_size=7,
                                  device=torch.device("cpu")) is None


def test_a_learner_metric_that_is_not_an_average_is_refused():
    learn = overfit_learner()
    learn.metrics = [F1Score()]
    from workers.loop.learner import mergeable_metrics

    with pytest.raises(WorkloadError, match="f1_score.*not a per-sample average"):
        mergeable_metrics(learn)


def test_a_learners_torchmetrics_metric_is_taken_whole_and_scores_the_whole_set():
    from torchmetrics.classification import MulticlassAUROC

    from workers.loop.learner import mergeable_metrics

    learn = overfit_learner()
    learn.metrics = [MulticlassAUROC(num_classes=2)]  # fastai wraps it as an AvgMetric
    [metric] = mergeable_metrics(learn)
    assert metric.name == "multiclass_auroc"
    x, y = learn.dls.valid_ds.tensors
    with torch.no_grad():
        logits = learn.model(x)
    for start in range(0, len(y), 7):  # batch by batch, as an epoch does
        metric.update(logits[start:start + 7], y[start:start + 7])
    whole = MulticlassAUROC(num_classes=2)(logits, y).item()
    assert metric.compute(metric.state()) == pytest.approx(whole, rel=1e-7)


def test_fastai_optimizer_state_loads_without_pickle_and_restores():
    torch.manual_seed(0)
    learn = overfit_learner()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, lr=2e-3)
    buffer = io.BytesIO()
    torch.save(PlainOptimizerState(learn).state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # no L, no numpy scalars

    fresh = overfit_learner()
    fresh.create_opt()
    PlainOptimizerState.load(fresh, state, torch.device("cpu"))
    assert fresh.opt.hypers == learn.opt.hypers
    for ours, theirs in zip(fresh.opt.state_dict()["state"], learn.opt.state_dict()["state"],
                            strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(theirs[key])), key


def test_a_learner_file_that_would_run_code_is_refused_by_the_documented_load(tmp_path):
    """docs/fastai.md loads a checkpoint's ``learner.pth`` with ``learn.load``: a file swapped for
    one that runs code when unpickled is refused, and its code never runs."""
    learn = overfit_learner()
    marker = tmp_path / "payload-ran"
    torch.save({"model": learn.model.state_dict(), "opt": Payload(marker)},
               tmp_path / "learner.pth")
    learn.path, learn.model_dir = tmp_path, "."
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        learn.load("learner", with_opt=True)
    assert not marker.exists(), "the payload ran"


def test_schedule_resolves_per_engine_and_fastai_takes_only_its_fits():
    base = {"workload": {"entrypoint": "m:f"}}
    assert RunConfig.model_validate(base).schedule == "constant"
    assert RunConfig.model_validate({**base, "engine": "fastai"}).schedule == "one_cycle"
    constant = {**base, "engine": "fastai", "train": {"schedule": "constant"}}
    assert RunConfig.model_validate(constant).schedule == "constant"
    torch_cycle = {**base, "train": {"schedule": "one_cycle"}}
    assert RunConfig.model_validate(torch_cycle).schedule == "one_cycle"
    for train in ({"schedule": "cosine"}, {"warmup_steps": 10}, {"grad_accum_steps": 2}):
        with pytest.raises(ValidationError) as info:
            RunConfig.model_validate({**base, "engine": "fastai", "train": train})
        assert format_validation_error(info.value).startswith(
            f"train.{next(iter(train))}: engine fastai trains with the Learner's fit_one_cycle")


def test_builtin_fastai_config_and_workload():
    cfg = load_config(REPO / "configs/digits_fastai.yaml")
    assert (cfg.engine, cfg.schedule, cfg.wandb.mode) == ("fastai", "one_cycle", "disabled")
    workload = build_workload(cfg.workload.entrypoint, cfg.workload.params)
    learn = workload.extras["learner"]
    assert len(workload.train_dataset) + len(workload.val_dataset) + \
        len(workload.test_dataset) == 1797  # scikit-learn's bundled digits, no download
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(2, 1e-2)
        _, accuracy = learn.validate(ds_idx=2)
    assert accuracy > 0.8


def test_the_torch_engine_never_imports_fastai():
    code = (
        "import sys, workers.engines.torch_engine, workers.loop.scoring\n"
        "import orchestrator.training.driver\n"
        "from workers.loop.learner import build_workload\n"
        "build_workload('workers.workloads.digits:build', {})\n"
        "import workers.engines; workers.engines.train_loop_for('torch')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'fastai'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]"
