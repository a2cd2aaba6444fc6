"""Which modules ``scaling.strategy: fsdp`` shards as units (pure logic: no process group)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.workloads.overfit import build as build_overfit
from workers.contract.user_errors import UserInputError
from workers.loop.sharding import shard_units


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.norm = nn.Linear(4, 4), nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x))


def test_by_default_the_layers_below_a_wrapper_are_the_units():
    model = build_overfit(norm=True).model  # a wrapper module around one Sequential
    units = shard_units(model, None)
    inner = model.inner
    assert units == [m for m in inner.children() if list(m.parameters())]
    assert [type(u).__name__ for u in units] == ["Linear", "BatchNorm1d", "Linear",
                                                  "BatchNorm1d", "Linear"]


def test_named_block_classes_inner_before_outer():
    model = nn.Sequential(Block(), nn.Sequential(Block(), nn.ReLU()), nn.Linear(4, 2))
    units = shard_units(model, ["Block", "Linear"])
    names = {id(m): n for n, m in model.named_modules()}
    order = [names[id(u)] for u in units]
    assert set(order) == {"0", "0.linear", "1.0", "1.0.linear", "2"}
    assert order.index("1.0.linear") < order.index("1.0")
    assert order.index("0.linear") < order.index("0")


def test_a_block_class_the_model_lacks_is_one_line_naming_what_it_has():
    with pytest.raises(UserInputError) as info:
        shard_units(nn.Sequential(Block(), nn.Linear(4, 2)), ["TransformerBlock"])
    message = str(info.value)
    assert "\n" not in message and message.startswith("scaling.fsdp_blocks: TransformerBlock")
    assert message.endswith("its module classes: Block, LayerNorm, Linear")
