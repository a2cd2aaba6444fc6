"""Unused parameters in one process: the probe behind ``scaling.find_unused_parameters: auto``,
DDP's error as one line, and FSDP units of a model whose blocks sit in a ``ModuleList``."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from tests.workloads.unused_params import build
from workers.contract.user_errors import UserInputError
from workers.loop.batches import Batches
from workers.loop.sharding import (
    loader_first_batch,
    loss_probe,
    shard_units,
    unused_parameters,
    unused_parameters_error,
)

DDP_ERROR = (
    "Expected to have finished reduction in the prior iteration before starting a new one. "
    "This error indicates that your module has parameters that were not used in producing "
    "loss.\nParameter indices which did not receive grad for rank 1: {indices}\n In addition, "
    "you can set the environment variable TORCH_DISTRIBUTED_DEBUG to either INFO or DETAIL")


def probe_of(workload):
    loader = DataLoader(workload.train_dataset, batch_size=16)
    return loss_probe(Batches.of(workload), lambda: loader_first_batch(loader))


def test_probe_names_the_unused_head_not_the_frozen_layer_and_restores_the_model() -> None:
    workload = build(layerdrop=0.0)
    model = workload.model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    assert unused_parameters(model, probe_of(workload), seed=3) == [
        "aux_head.weight", "aux_head.bias"]
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_the_probe_is_an_eval_forward_unseen_by_training_only_code() -> None:
    """LayerDrop (training only) skips nothing in the probe, and a model's training-mode
    bookkeeping (here: counting its training forwards) does not see it."""
    workload = build(layerdrop=1.0)  # every block skipped, in training only
    model = workload.model.train()
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    names = unused_parameters(model, probe_of(workload))
    assert names == ["aux_head.weight", "aux_head.bias"]
    assert seen == [False] and model.training


def test_loader_first_batch_is_the_loaders_first_batch() -> None:
    workload = build()
    loader = DataLoader(workload.train_dataset, batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    x, y = loader_first_batch(loader)
    assert x.shape == (16, 8) and y.shape == (16,)


def test_ddps_error_becomes_one_line_with_the_names_of_its_indices() -> None:
    model = build().model  # trainable: stem (4), blocks (6), head (2), aux_head (2)
    error = unused_parameters_error(RuntimeError(DDP_ERROR.format(indices="12 13")), model)
    assert isinstance(error, UserInputError) and "\n" not in str(error)
    assert "aux_head.weight, aux_head.bias on rank 1" in str(error)
    assert "scaling.find_unused_parameters: true" in str(error)
    named = RuntimeError(DDP_ERROR.replace(
        "Parameter indices", "Parameters which did not receive grad for rank 0: a.w, b.w\n"
        "Parameter indices").format(indices="0 1"))
    assert "a.w, b.w on rank 0" in str(unused_parameters_error(named, None))
    assert unused_parameters_error(RuntimeError("CUDA out of memory"), model) is None
    assert unused_parameters_error(ValueError(DDP_ERROR), model) is None


def test_fsdp_units_look_into_a_module_list() -> None:
    model = build().model
    units = shard_units(model, None)
    assert [type(u).__name__ for u in units] == [
        "Sequential", "Linear", "Block", "Block", "Block", "Linear", "Linear"]
