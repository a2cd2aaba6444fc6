"""checkpoint.average_top_k: the pure average and verdict (``decisions.averaging``), the
config's refusals, and the end-of-run step on saved checkpoints without Ray
(``workers.loop.averaging``): BatchNorm recomputed and the validation score, each against an
independent computation; the winner written and re-scored from its files."""

from __future__ import annotations

import contextlib
import json
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



# -- where the average won, every surface says it is the best model -------------------------
# A run directory made by hand (the K kept models, history.json), summarised by the project's
# own ``summarize`` with its two Ray tasks run in this process (the average, the test split):
# summary.json, ``best_checkpoint`` / ``load_best``, ``orchestrator best``'s tables and the
# W&B run (offline, read back with ``wandb leet inspect``) agree on which model is the best.

SMALL = {"norm": False, "with_test": True, "hidden": 16}


def _hand_made_run(tmp_path: Path, values: list[float], monkeypatch,
                   wandb_mode: str = "disabled", keep: str = "best_and_last"):
    """Epochs 1..len(values) with those val_loss values (the ones their metadata claims: the
    verdict is the rule's, whatever the weights score); the models of the 3 best kept, as Ray
    keeps them (the 4th best's deleted). Returns (cfg, run_dir, summary)."""
    from orchestrator.results import averaging as averaging_module
    from orchestrator.results import summary as summary_module
    from orchestrator.results.summary import summarize
    from tests.unit.run_files import history_record, write_history
    from tests.workloads.overfit import build
    from workers.checkpoint.snapshot import snapshot

    cfg = RunConfig.model_validate({
        "name": "avg", "storage_path": str(tmp_path / "runs"), "seed": 0,
        "workload": {"entrypoint": OVERFIT, "params": SMALL},
        "train": {"epochs": len(values), "batch_size": 8}, "tracker": {"monitor": "val_loss"},
        "checkpoint": {"keep_top_k": 3, "average_top_k": 3},
        "wandb": {"mode": wandb_mode, "keep": keep}})
    run_dir = tmp_path / "runs" / "avg"
    run_dir.mkdir(parents=True)
    top = sorted(range(len(values)), key=lambda i: values[i])[:3]
    records, best = [], math.inf
    for i, value in enumerate(values):
        epoch, improved = i + 1, value < best
        best = min(best, value)
        path = None
        if i in top:
            torch.manual_seed(epoch)
            metadata = {"epoch": epoch, "global_step": 4 * epoch, "train_loss": 1.0 / epoch,
                        "val_loss": value, "monitor": "val_loss", "mode": "min",
                        "is_best": improved, "saved_because": "best", "top_k_rank": 1,
                        "test_split": True, "config": cfg.to_dict()}
            path = run_dir / f"checkpoint_epoch{epoch:04d}_{epoch}"
            write_checkpoint(snapshot(build(**SMALL).model.state_dict(), None,
                                      {"epoch": epoch}, metadata),
                             pafs.LocalFileSystem(), str(path))
        records.append({**history_record(epoch, value, improved, path), "global_step": 4 * epoch})
    write_history(run_dir, records)

    def score_here(cfg, paths, best_value, target, use_gpu):  # the Ray task, in this process
        return average_checkpoints(cfg.to_dict(), [_Local(Path(p)) for p in paths],
                                   best_value, target)

    monkeypatch.setattr(averaging_module, "_score", score_here)
    monkeypatch.setattr(summary_module, "evaluate_test_split",
                        lambda cfg, path, use_gpu: evaluate_split(cfg, path, "test"))
    summary = summarize(cfg, str(run_dir), use_gpu=False, start="fresh")
    return cfg, run_dir, summary


WINS = [9.0, 8.0, 8.5, 8.2]  # claimed far worse than any model scores: the average wins
LOSES = [0.09, 0.08, 0.085, 0.082]  # claimed far better: it loses


@pytest.mark.parametrize("outcome", ["won", "lost"])
def test_the_summary_and_load_best_agree_on_the_best_model(tmp_path, monkeypatch, outcome):
    from orchestrator.api import best_checkpoint, load_best
    from orchestrator.results.averaging import averaged_dir

    cfg, run_dir, summary = _hand_made_run(tmp_path, WINS if outcome == "won" else LOSES,
                                           monkeypatch)
    averaged, ranked = summary["averaged"], summary["best_checkpoints"]
    # best_checkpoints: the K single models, best first, whoever won.
    assert [(r["rank"], r["epoch"]) for r in ranked] == [(1, 2), (2, 4), (3, 3)]
    assert averaged["averaged_from"] == [r["path"] for r in ranked]
    assert averaged["won"] is (outcome == "won")
    target = averaged_dir(str(run_dir), 3)
    winner = target if outcome == "won" else ranked[0]["path"]
    assert summary["best_checkpoint"] == winner
    assert Path(target).exists() is (outcome == "won")
    # the single best's record either way (the average is no evaluation); the test split
    # scored with the winner
    assert summary["best_epoch"] == 2 and summary["best_metrics"]["val_loss"] == 8.0 * (
        1 if outcome == "won" else 0.01)
    assert summary["test_metrics"]["test_loss"] == pytest.approx(
        evaluate_split(cfg, winner, "test")["test_loss"], rel=1e-6)

    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert best_checkpoint(run_dir) == winner  # the default: best_checkpoint
    for rank, single in enumerate(ranked, start=1):  # rank k: the k-th single model
        assert best_checkpoint(run_dir, rank=rank) == single["path"]
    loaded = load_best(run_dir)
    assert loaded.checkpoint == winner
    assert (loaded.metadata.get("weights") == "averaged") is (outcome == "won")
    from safetensors.torch import load_file

    on_disk = load_file(str(Path(winner) / "model.safetensors"))
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, on_disk[name]), name
    first = load_best(run_dir, rank=1)
    assert first.checkpoint == ranked[0]["path"] and first.metadata["epoch"] == 2


def test_orchestrator_best_shows_the_average_first_where_it_won(tmp_path, monkeypatch,
                                                                 capsys):
    from orchestrator.cli.tables import (
        best_checkpoints_table,
        make_console,
        monitors_table,
        print_summary,
        summary_table,
    )

    _, _, won = _hand_made_run(tmp_path / "won", WINS, monkeypatch)
    table = best_checkpoints_table(won)
    assert [list(c.cells) for c in table.columns][0] == ["avg", "1", "2", "3"]
    assert list(table.columns[1].cells)[0] == "2, 4, 3"  # the epochs averaged, best first
    assert list(table.columns[2].cells)[0] == f"{won['averaged']['value']:.6g}"
    assert list(table.columns[3].cells)[0] == "averaged_top_3"
    headers = [c.header for c in summary_table(won).columns]
    assert headers == ["metric", "best epoch", "average of the 3 best (the best model)",
                       "test (average of the 3 best)"]
    row = list(monitors_table(won).columns[2].cells)  # the primary's epoch: the average
    assert row == ["avg"]
    print_summary(won, make_console())
    out = capsys.readouterr().out
    value, by = won["averaged"]["value"], won["averaged"]["by"]
    assert (f"average of the 3 best (avg): val_loss {value:.6g}, better than rank 1 by "
            f"{by:.6g}; it is the best model") in out
    assert f"best model: {won['best_checkpoint']} (average of the 3 best)" in out

    _, _, lost = _hand_made_run(tmp_path / "lost", LOSES, monkeypatch)
    table = best_checkpoints_table(lost)
    assert list(table.columns[0].cells) == ["1", "2", "3"]
    assert [c.header for c in summary_table(lost).columns] == [
        "metric", "best epoch", "test (best weights)"]
    print_summary(lost, make_console())
    out = capsys.readouterr().out
    value, by = lost["averaged"]["value"], -lost["averaged"]["by"]
    assert (f"average of the 3 best: val_loss {value:.6g}, worse than rank 1 by {by:.6g}; "
            "not kept, rank 1 is the best model") in out
    assert f"best model: {lost['best_checkpoint']}\n" in out


@pytest.fixture
def wandb_dirs(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        path = tmp_path / var.lower()
        path.mkdir()
        monkeypatch.setenv(var, str(path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _logged_models(run_dir: str) -> list[dict]:
    import subprocess
    import sys

    proc = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect",
                           "--json", run_dir], capture_output=True, text=True, timeout=120,
                          check=True)
    found = []
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        if record.get("type") == "artifact":
            artifact = record["artifact"]
            artifact["metadata"] = json.loads(artifact.get("metadata") or "{}")
            found.append(artifact)
    return found


@pytest.mark.parametrize(("outcome", "keep"), [("won", "best_and_last"), ("won", "all"),
                                               ("lost", "best_and_last")])
def test_wandb_moves_best_to_the_average_only_where_it_won(tmp_path, monkeypatch, wandb_dirs,
                                                           outcome, keep):
    """Offline, ``keep: best_and_last`` logs the kept models at the end (``_log_kept``);
    ``keep: all`` logs each as it is saved (here: each kept one, in order) and moves the
    aliases at the end (``_move_best_alias``): the average's version gets ``best`` last."""
    from orchestrator.tracking.wandb_run import open_run
    from workers.contract.names import METADATA_FILE

    cfg, run_dir, summary = _hand_made_run(tmp_path, WINS if outcome == "won" else LOSES,
                                           monkeypatch, wandb_mode="offline", keep=keep)
    run = open_run(cfg, str(run_dir))
    if keep == "all":  # the live path: each saved model logged as the run went
        for c in sorted(summary["best_checkpoints"], key=lambda c: c["epoch"]):
            run.log_model(c["path"], json.loads((Path(c["path"]) / METADATA_FILE).read_text()))
    info = run.finish(summary, None)
    logged = _logged_models(info["run"])
    assert all(a["name"] == "avg-model" and a["type"] == "model" for a in logged)
    # W&B moves an alias to the newest version logged with it: each alias' last holder.
    holder = {alias: a for a in logged for alias in a["aliases"]}
    ranked = summary["best_checkpoints"]
    if outcome == "lost":
        assert not any(a["metadata"].get("weights") == "averaged" for a in logged)
        assert holder["best"]["metadata"]["epoch"] == ranked[0]["epoch"]
        assert "top-1" not in holder and "averaged-top-3" not in holder
        return
    best = holder["best"]
    assert "averaged-top-3" in best["aliases"] and holder["averaged-top-3"] is best
    assert best["metadata"]["weights"] == "averaged"
    record = best["metadata"]["averaged"]
    assert record["k"] == 3 and record["epochs"] == [2, 4, 3]
    assert record["global_steps"] == [8, 16, 12]
    assert record["averaged_from"] == [Path(r["path"]).name for r in ranked]
    assert record["value"] == summary["averaged"]["value"] and record["by"] > 0
    assert best["metadata"]["val_loss"] == summary["averaged"]["value"]
    files = {c["path"]: c for c in best["manifest"]["contents"]}
    import base64
    import hashlib

    weights = Path(summary["best_checkpoint"]) / "model.safetensors"
    assert files["model.safetensors"]["digest"] == base64.b64encode(
        hashlib.md5(weights.read_bytes()).digest()).decode()
    # the K single models keep their ranks, the single best as top-1, and their epochs
    for rank, single in enumerate(ranked, start=1):
        assert holder[f"top-{rank}"]["metadata"]["epoch"] == single["epoch"]
        assert holder[f"epoch-{single['epoch']}"]["metadata"].get("weights") != "averaged"
