"""``train.ema_decay`` on two real gloo processes (no Ray), under DDP and under FSDP2: the EMA
of the weights, updated after every optimizer step, is evaluated exactly (the engine's path:
rank 0's buffers broadcast, each rank's strided validation share, one all-reduce), and

- both ranks see the same raw and EMA metrics, each equal (1e-6) to ONE process scoring the
  whole validation set with the weights rank 0 saves (the EMA's read whole: ``weights``);
- under DDP both ranks hold the same EMA; under FSDP each rank holds only its shards (about
  half of it) and the EMA read whole equals DDP's (the same training, to 1e-5);
- after the EMA's evaluation the model holds the raw weights again (their score unchanged).

The model has a BatchNorm (buffers that differ between the ranks after training) and a last
layer of 3 rows (sharded unevenly); the validation set (37) divides into neither shard.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.distributed.ranks import in_ranks
from workers.evaluation.collectives import broadcast_buffers, most_on_any_rank
from workers.evaluation.metrics import build_metrics
from workers.loop.ema import WeightsEma
from workers.loop.loaders import shard
from workers.loop.scoring import accumulate, evaluate_dataset, global_metrics
from workers.loop.sharding import ShardedState, fully_shard_model

pytestmark = pytest.mark.distributed

CPU = torch.device("cpu")
FEATURES, CLASSES, BATCH, STEPS, DECAY = 6, 3, 8, 6, 0.7
METRICS = ["accuracy", "f1_macro"]


def model_and_data() -> tuple[nn.Module, TensorDataset, TensorDataset]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(),
                          nn.Linear(16, CLASSES))
    g = torch.Generator().manual_seed(1)
    train = TensorDataset(torch.randn(2 * BATCH * STEPS, FEATURES, generator=g),
                          torch.randint(0, CLASSES, (2 * BATCH * STEPS,), generator=g))
    val = TensorDataset(torch.randn(37, FEATURES, generator=g),
                        torch.randint(0, CLASSES, (37,), generator=g))
    return model, train, val


def score(plain: nn.Module, val: TensorDataset, rank: int, fsdp: bool) -> dict[str, float]:
    """The engine's exact evaluation of the weights the model holds now."""
    broadcast_buffers(plain)
    loader = DataLoader(shard(val, rank, 2), batch_size=BATCH)
    forwards = most_on_any_rank(len(loader), CPU) if fsdp else 0
    metrics = build_metrics(METRICS, CLASSES)
    loss = accumulate(plain, loader, nn.functional.cross_entropy, metrics, CPU,
                      forwards=forwards, padding_input=val[:BATCH][0])
    plain.train()
    return global_metrics([("val", loss, metrics)], CPU)


def rank_case(strategy: str, rank: int) -> dict[str, Any]:
    model, train, val = model_and_data()
    fsdp = strategy == "fsdp"
    if fsdp:
        trained = plain = fully_shard_model(model, None, CPU, 2, "fp32")
    else:
        plain = model
        trained = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.3)
    ema = WeightsEma(plain, DECAY)
    loader = DataLoader(shard(train, rank, 2), batch_size=BATCH)
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(trained(x), y).backward()
        optimizer.step()
        ema.update()
    raw_before = score(plain, val, rank, fsdp)
    with ema.swapped():
        ema_values = score(plain, val, rank, fsdp)
    raw_after = score(plain, val, rank, fsdp)
    raw_weights = (ShardedState(plain, None).weights() if fsdp
                   else {k: v.clone() for k, v in plain.state_dict().items()})
    return {"raw": raw_before, "raw_after": raw_after, "ema": ema_values,
            "ema_weights": {k: v.clone() for k, v in ema.weights().items()},
            "raw_weights": raw_weights, "local": sum(s.numel() for s in ema.shadow),
            "updates": ema.updates}


def one_process(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    model, _, val = model_and_data()
    model.load_state_dict(weights)
    return evaluate_dataset(model, val, nn.functional.cross_entropy,
                            build_metrics(METRICS, CLASSES), split="val", batch_size=BATCH,
                            device=CPU)


def close(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), key


def both_strategies(rank: int) -> dict[str, dict[str, Any]]:
    """ddp, then fsdp, in one process group (one start of the ranks)."""
    return {s: rank_case(s, rank) for s in ("ddp", "fsdp")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    ranks = in_ranks(both_strategies, tmp_path_factory.mktemp("ema"))
    return {s: [r[s] for r in ranks] for s in ("ddp", "fsdp")}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ema_evaluation_is_exact_and_the_same_on_both_ranks(
        runs: dict[str, list[dict[str, Any]]], strategy: str) -> None:
    r0, r1 = runs[strategy]
    assert r0["updates"] == r1["updates"] == STEPS
    for key in ("raw", "ema", "raw_after"):
        assert r0[key] == r1[key], key  # identical on every rank
    assert r0["raw_after"] == r0["raw"]  # the raw weights are back
    assert r0["ema"] != r0["raw"]
    close(one_process(r0["ema_weights"]), r0["ema"])
    close(one_process(r0["raw_weights"]), r0["raw"])


def test_ddp_ranks_hold_the_same_ema(runs: dict[str, list[dict[str, Any]]]) -> None:
    r0, r1 = runs["ddp"]
    for name, value in r0["ema_weights"].items():
        assert torch.equal(value, r1["ema_weights"][name]), name


def test_fsdp_ema_is_sharded_and_equals_ddps(runs: dict[str, list[dict[str, Any]]]) -> None:
    ddp, fsdp = runs["ddp"][0], runs["fsdp"]
    assert fsdp[1]["ema_weights"] == {}  # whole on rank 0 only
    total = ddp["local"]
    # Each rank's share: its shards of the parameters, and the (unsharded) BN buffers.
    buffers = 2 * 16
    for rank in fsdp:
        assert rank["local"] - buffers <= (total - buffers) / 2 + 16
    assert fsdp[0]["local"] + fsdp[1]["local"] - 2 * buffers == total - buffers
    for name, value in ddp["ema_weights"].items():
        torch.testing.assert_close(fsdp[0]["ema_weights"][name], value, rtol=1e-5, atol=1e-5)
