"""checkpoint.average_top_k: the pure average and verdict (``decisions.averaging``), the
config's refusals, and the end-of-run step on saved checkpoints without Ray
(``workers.loop.averaging``): BatchNorm recomputed and the validation score, each against an
independent computation; the winner written and re-scored from its files."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from orchestrator.results.checkpoints import verify_checkpoint
from workers.checkpoint.load import load_metadata
from workers.checkpoint.snapshot import Snapshot
from workers.checkpoint.writer import write_checkpoint
from workers.contract.config import RunConfig
from workers.decisions.averaging import average_weights, average_wins, margin
from workers.loop.averaging import average_checkpoints
from workers.loop.scoring import evaluate_split

OVERFIT = "tests.workloads.overfit:build"


def test_the_average_of_known_tensors_keeps_the_best_ones_integers():
    states = [{"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16),
               "n": torch.tensor(5)},
              {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([2.0], dtype=torch.float16),
               "n": torch.tensor(9)},
              {"w": torch.tensor([5.0, 1.0]), "h": torch.tensor([4.0], dtype=torch.float16),
               "n": torch.tensor(1)}]
    averaged = average_weights(states)
    assert torch.equal(averaged["w"], torch.tensor([3.0, 3.0]))
    assert averaged["h"].dtype == torch.float16
    assert averaged["h"].item() == pytest.approx(7 / 3, rel=1e-3)
    assert averaged["n"].item() == 5 and averaged["n"].dtype == torch.int64  # the best's
    averaged["n"] += 1
    assert states[0]["n"].item() == 5  # a copy, not the best's own tensor


def test_states_that_do_not_match_are_refused():
    with pytest.raises(ValueError, match="differ"):
        average_weights([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="shapes"):
        average_weights([{"a": torch.zeros(1)}, {"a": torch.zeros(2)}])
    with pytest.raises(ValueError, match="no states"):
        average_weights([])


@pytest.mark.parametrize(("value", "best", "mode", "wins"), [
    (0.4, 0.5, "min", True), (0.6, 0.5, "min", False), (0.5, 0.5, "min", False),  # a tie: no
    (0.6, 0.5, "max", True), (0.4, 0.5, "max", False), (0.5, 0.5, "max", False),
    (math.nan, 0.5, "min", False), (math.inf, 0.5, "max", False),  # never a non-finite one
    (0.9, math.nan, "min", True),  # any finite value beats a best that is not finite
])
def test_who_wins(value, best, mode, wins):
    assert average_wins(value, best, mode) is wins


def test_the_margin_is_positive_when_better():
    assert margin(0.4, 0.5, "min") == pytest.approx(0.1)
    assert margin(0.4, 0.5, "max") == pytest.approx(-0.1)
    assert math.isnan(margin(math.nan, 0.5, "min"))


def _config(tmp_path: Path, **checkpoint) -> RunConfig:
    return RunConfig.model_validate({
        "name": "avg", "storage_path": str(tmp_path), "workload": {
            "entrypoint": OVERFIT, "params": {"norm": True, "with_test": False}},
        "train": {"batch_size": 8}, "tracker": {"monitor": "val_loss"},
        "checkpoint": {"keep_top_k": 3, "average_top_k": 3, **checkpoint},
        "wandb": {"mode": "disabled"}})


@pytest.mark.parametrize(("checkpoint", "says"), [
    ({"keep_top_k": 2}, "checkpoint.keep_top_k .2. keeps fewer"),
    ({"policy": "last", "keep_top_k": 1}, "only checkpoint.policy best uses it"),
    ({"average_top_k": 1}, "greater than or equal to 2"),
])
def test_refused_in_one_line_naming_the_key(tmp_path, checkpoint, says):
    with pytest.raises(ValueError, match=says) as refused:
        _config(tmp_path, **checkpoint)
    assert "average_top_k" in str(refused.value)


def test_refused_when_the_monitor_is_not_a_validation_metric(tmp_path):
    cfg = _config(tmp_path).to_dict()
    cfg["tracker"]["monitor"] = "train_loss"
    with pytest.raises(ValueError, match="checkpoint.average_top_k: .* not a val_ metric"):
        RunConfig.model_validate(cfg)


class _Local:
    """What the task body uses of a ray.train.Checkpoint on local storage."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def _saved_models(cfg: RunConfig, run_dir: Path, n: int) -> list[Path]:
    """``n`` checkpoints of the BatchNorm model, each trained a few steps further, with
    running statistics that are not the training data's (so a recompute shows)."""
    from tests.workloads.overfit import build

    torch.manual_seed(cfg.seed)
    workload = build(**cfg.workload.params)
    optimizer = torch.optim.SGD(workload.model.parameters(), lr=0.05)
    x, y = workload.train_dataset.tensors
    paths = []
    for i in range(n):
        workload.model.train()
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(workload.model(x * (1 + i)), y).backward()
            optimizer.step()
        path = run_dir / f"checkpoint_epoch{i + 1:04d}"
        path.mkdir(parents=True)
        weights = {k: v.detach().clone() for k, v in workload.model.state_dict().items()}
        metadata = {"epoch": i + 1, "monitor": "val_loss", "val_loss": 1.0, "is_best": i == 0,
                    "top_k_rank": 1, "saved_because": "best"}
        write_checkpoint(Snapshot(weights, {}, metadata), pafs.LocalFileSystem(), str(path))
        paths.append(path)
    return paths


def _independent_score(cfg: RunConfig, paths: list[Path]) -> tuple[dict, float]:
    """The average, BatchNorm statistics and val_loss computed here from first principles:
    the mean of the weights, the cumulative mean of each batch's mean and unbiased variance,
    the mean cross-entropy over the validation split."""
    from safetensors.torch import load_file

    from tests.workloads.overfit import build

    states = [load_file(str(p / "model.safetensors")) for p in paths]
    workload = build(**cfg.workload.params)
    model = workload.model
    averaged = {k: (sum(s[k].double() for s in states) / len(states)).float()
                if s0.is_floating_point() else s0 for k, s0 in states[0].items()}
    model.load_state_dict(averaged)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    sums = {id(m): [torch.zeros_like(m.running_mean), torch.zeros_like(m.running_var)]
            for m in norms}
    seen = {}

    def record(module, inputs, _output):
        a = inputs[0].double()
        sums[id(module)][0] += a.mean(0).float()
        sums[id(module)][1] += a.var(0, unbiased=True).float()
        seen[id(module)] = seen.get(id(module), 0) + 1

    hooks = [m.register_forward_hook(record) for m in norms]
    x, _ = workload.train_dataset.tensors
    model.train()
    with torch.no_grad():
        for start in range(0, len(x), cfg.train.batch_size):
            model(x[start:start + cfg.train.batch_size])
    for h in hooks:
        h.remove()
    expected_stats = {}
    for m in norms:
        expected_stats[id(m)] = (sums[id(m)][0] / seen[id(m)], sums[id(m)][1] / seen[id(m)])
        m.running_mean.copy_(expected_stats[id(m)][0])
        m.running_var.copy_(expected_stats[id(m)][1])
    model.eval()
    xv, yv = workload.val_dataset.tensors
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(xv).double(), yv).item()
    return {k: v.clone() for k, v in model.state_dict().items()}, loss


@pytest.mark.parametrize("outcome", ["won", "lost"])
def test_the_average_is_scored_exactly_and_written_only_when_it_wins(tmp_path, outcome):
    cfg = _config(tmp_path)
    paths = _saved_models(cfg, tmp_path / "avg", 3)
    expected_state, expected_loss = _independent_score(cfg, paths)
    best_value = expected_loss + (1.0 if outcome == "won" else -1e-3)
    target = tmp_path / "avg" / "averaged_top_3"
    result = average_checkpoints(cfg.to_dict(), [_Local(p) for p in paths], best_value,
                                 str(target))
    assert result["batch_norm"] is True
    assert result["value"] == pytest.approx(expected_loss, rel=1e-6)
    assert result["won"] is (outcome == "won")
    if outcome == "lost":
        assert not target.exists()
        return
    assert verify_checkpoint(str(target)) is None  # the digests of what was written
    metadata = load_metadata(target)
    assert metadata["weights"] == "averaged" and "top_k_rank" not in metadata
    assert metadata["averaged_from"] == [p.name for p in paths]
    from safetensors.torch import load_file

    saved = load_file(str(target / "model.safetensors"))
    for name, tensor in expected_state.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(saved[name], tensor, rtol=1e-5, atol=1e-6)
        else:
            # update_bn counts its own pass: 32 training samples in batches of 8
            assert name.endswith("num_batches_tracked") and saved[name].item() == 4
    rescored = evaluate_split(cfg, target, "val")
    assert rescored is not None
    assert rescored["val_loss"] == pytest.approx(result["value"], rel=1e-6)

