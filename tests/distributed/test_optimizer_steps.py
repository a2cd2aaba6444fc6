"""Two real gloo processes (no Ray) train with the engine's optimizer steps (``Stepper``,
driven by ``train_epoch``), under DDP and under FSDP2, and must end with the weights of ONE
process taking the same optimizer steps on the same samples (to 1e-6 on every weight):

- accumulation: 4 micro-batches of 8 on each of 2 ranks make one step, as one process
  stepping once per batch of those 64 samples; when a rank's batches are not a multiple of 4,
  the last step of each epoch has fewer micro-batches and is the mean over its samples only;
- clipping by the global gradient norm (small enough that it really clips): as one process
  clipping the gradient of the same 16 samples with ``torch.nn.utils.clip_grad_norm_``;
  under FSDP each rank holds a shard of every gradient, so the norm must be reduced across
  the ranks;
- the gradients are synchronised between the ranks on the last micro-batch of a step only.

The shards are the engine's strided ones (rank r takes samples r, r+2, ...), in order, so the
reference rebuilds each step's samples from the same indices. Plain SGD (no momentum): each
step's update is then the learning rate times that step's mean gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.distributed.ranks import in_ranks
from workers.loop.loaders import shard
from workers.loop.optim import Stepper
from workers.loop.training import train_epoch

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
BATCH = 8  # per rank and micro-batch
NUM_FEATURES, HIDDEN, NUM_CLASSES = 6, 16, 3  # the last layer (3 rows) shards unevenly
LR = 0.5
EPOCHS = 2
CPU = torch.device("cpu")
ATOL = 1e-6


@dataclass(frozen=True)
class Case:
    n: int  # samples; every rank's shard is a multiple of BATCH: all micro-batches are full
    accum: int = 1
    clip: float | None = None


CASES = {
    # 128 samples a rank: 16 micro-batches, 4 steps of 4 an epoch.
    "accumulate": Case(n=256, accum=4),
    # 80 samples a rank: 10 micro-batches, steps of 4, 4 and then 2.
    "accumulate_short_last_step": Case(n=160, accum=4),
    # 32 samples a rank: 4 steps an epoch, each on 16 samples; the gradient norms are 0.5
    # and more, ten times max_norm: every step clips.
    "clip": Case(n=64, clip=0.05),
}
STRATEGIES = ["ddp", "fsdp"]


def model_and_data(n: int) -> tuple[torch.nn.Module, TensorDataset]:
    """The same model and data in every process (fixed seeds). No BatchNorm nor dropout: a
    micro-batch's statistics (or random mask) differ from those of the whole batch, and the
    weights could not then equal one process stepping on the whole batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(NUM_FEATURES, HIDDEN), torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, NUM_CLASSES),
    )
    gen = torch.Generator().manual_seed(1000 + n)
    x = torch.randn(n, NUM_FEATURES, generator=gen)  # (N, F)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)  # (N,)
    return model, TensorDataset(x, y)


def counting_allreduce(calls: list[int]) -> Any:
    """A DDP comm hook: counts the buckets all-reduced (in ``calls``), then does DDP's default
    all-reduce."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)

    return hook


def local_grads(model: torch.nn.Module) -> torch.Tensor | None:
    """This rank's own gradients (its shard of them under fsdp), flat; None if it has none."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    return torch.cat([g.detach().reshape(-1) for g in local])


def recording_loss(model: torch.nn.Module, seen: list[torch.Tensor | None], out: torch.Tensor,
                   target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, noting first the gradients the micro-batches before this one left."""
    seen.append(local_grads(model))
    return torch.nn.functional.cross_entropy(out, target)


def train_case(rank: int, strategy: str, case: Case) -> dict[str, Any]:
    """Trains one model for EPOCHS epochs on this rank's shard, as the engine does."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.nn.parallel import DistributedDataParallel

    from workers.loop.sharding import fully_shard_model

    model, dataset = model_and_data(case.n)
    allreduces: list[int] = []
    if strategy == "ddp":
        model = DistributedDataParallel(model)
        model.register_comm_hook(None, counting_allreduce(allreduces))
    else:
        model = fully_shard_model(model, None, CPU, WORLD_SIZE, "fp32")
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0)
    stepper = Stepper(optimizer, accum=case.accum, clip=case.clip)
    loader = DataLoader(shard(dataset, rank, WORLD_SIZE), batch_size=BATCH, shuffle=False)
    seen: list[torch.Tensor | None] = []
    for _ in range(EPOCHS):
        train_epoch(model, loader, partial(recording_loss, model, seen), stepper, CPU)
    if strategy == "ddp":
        weights = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    else:  # a collective: every rank takes part, rank 0 gets the whole weights
        weights = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"weights": weights, "allreduces": len(allreduces), "seen": seen,
            "micro_batches": len(loader)}


def every_case(rank: int) -> dict[str, dict[str, Any]]:
    """Every strategy and case, one after the other, in one process group (one start of the
    ranks)."""
    return {strategy: {mode: train_case(rank, strategy, case) for mode, case in CASES.items()}
            for strategy in STRATEGIES}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``get(strategy, mode)``: both ranks' results of that case. The processes start once,
    for every test here."""
    ranks = in_ranks(every_case, tmp_path_factory.mktemp("steps"), WORLD_SIZE)

    def get(strategy: str, mode: str) -> list[dict[str, Any]]:
        return [r[strategy][mode] for r in ranks]

    return get


def step_samples(n: int, accum: int) -> list[list[int]]:
    """Each epoch's optimizer steps, as the dataset indices of their samples: step s takes
    micro-batches [s*accum, (s+1)*accum) of both ranks (fewer for the last, if the batches do
    not divide by accum); rank r's shard is r, r+2, r+4, ..."""
    shards = [list(range(r, n, WORLD_SIZE)) for r in range(WORLD_SIZE)]
    assert all(len(s) == len(shards[0]) and len(s) % BATCH == 0 for s in shards)
    batches = len(shards[0]) // BATCH
    return [
        [i for part in shards for i in part[first * BATCH:min(first + accum, batches) * BATCH]]
        for first in range(0, batches, accum)
    ]


def single_process(case: Case, accum: int | None = None, clip: float | None = None,
                   short_step_as_full: bool = False,
                   ) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process, one step per batch of each step's samples (plain torch, no Stepper):
    (the final weights, the gradient norms before clipping). ``short_step_as_full``: what a
    short last step would give with each micro-batch's loss divided by accum, not by the
    number of micro-batches in it (a wrong reference, for the guard below)."""
    model, dataset = model_and_data(case.n)
    x, y = dataset.tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0)
    norms = []
    for _ in range(EPOCHS):
        for idx in step_samples(case.n, case.accum if accum is None else accum):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            if short_step_as_full:
                loss = loss * len(idx) / (WORLD_SIZE * BATCH * case.accum)
            loss.backward()
            if clip is not None:
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            optimizer.step()
            optimizer.zero_grad()
    return model.state_dict(), norms


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("mode", list(CASES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_trained_weights_equal_one_process_stepping_on_the_same_samples(
        two_ranks: Any, strategy: str, mode: str) -> None:
    case = CASES[mode]
    ranks = two_ranks(strategy, mode)
    want, norms = single_process(case, clip=case.clip)
    if case.clip is not None:  # clipping really happened, at every step
        assert len(norms) == EPOCHS * len(step_samples(case.n, 1))
        assert min(norms) > case.clip, norms

    got = ranks[0]["weights"]
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0, msg=key)
    if strategy == "ddp":  # every rank holds the whole model: the same one
        for key in want:
            assert torch.equal(ranks[1]["weights"][key], got[key]), key


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradients_are_synchronised_only_on_the_last_micro_batch_of_a_step(
        two_ranks: Any, strategy: str) -> None:
    """Seen from each micro-batch's loss_fn: the gradients the ones before it in its step
    left, and (ddp) the all-reduces made."""
    case = CASES["accumulate_short_last_step"]
    ranks = two_ranks(strategy, "accumulate_short_last_step")
    micro_batches = ranks[0]["micro_batches"]
    steps = len(step_samples(case.n, case.accum))
    assert (micro_batches, steps) == (10, 3)  # steps of 4, 4 and 2 micro-batches
    # Where each micro-batch stands in its step: 0, 1, 2, 3, 0, 1, 2, 3, 0, 1 (each epoch).
    position = [i % case.accum for i in range(micro_batches)] * EPOCHS
    seen = [r["seen"] for r in ranks]
    assert [len(s) for s in seen] == [len(position)] * WORLD_SIZE

    if strategy == "ddp":
        # One all-reduce (of the one bucket of this small model) per optimizer step, none for
        # the other micro-batches.
        assert [r["allreduces"] for r in ranks] == [EPOCHS * steps] * WORLD_SIZE
        for i, pos in enumerate(position):
            if pos == 0:  # a step begins: the last one's gradients were cleared
                assert seen[0][i] is None and seen[1][i] is None, i
            else:  # each rank's own gradients so far, never averaged: they differ
                assert seen[0][i] is not None and seen[1][i] is not None, i
                assert float((seen[0][i] - seen[1][i]).abs().max()) > 1000 * ATOL, i
    else:
        # FSDP2 keeps a non-last micro-batch's gradients unsharded, unreduced: no sharded
        # gradient exists until the last micro-batch's reduce-scatter, and the step clears it.
        for r in range(WORLD_SIZE):
            assert [i for i, g in enumerate(seen[r]) if g is not None] == [], r


def test_the_references_tell_apart_what_these_tests_check() -> None:
    """Guards the tests above: a step per micro-batch, a short last step's losses divided by
    accum (not by its own number of micro-batches), or no clipping would each give weights
    a thousand times the tolerance away."""
    for mode in ("accumulate", "accumulate_short_last_step"):
        case = CASES[mode]
        accumulated, _ = single_process(case)
        per_micro_batch, _ = single_process(case, accum=1)
        assert max_abs_diff(accumulated, per_micro_batch) > 1000 * ATOL, mode
    case = CASES["accumulate_short_last_step"]
    short_as_full, _ = single_process(case, short_step_as_full=True)
    assert max_abs_diff(single_process(case)[0], short_as_full) > 1000 * ATOL
    clipped, _ = single_process(CASES["clip"], clip=CASES["clip"].clip)
    unclipped, _ = single_process(CASES["clip"])
    assert max_abs_diff(clipped, unclipped) > 1000 * ATOL
