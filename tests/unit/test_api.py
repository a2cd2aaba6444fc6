"""The Python API's pure parts: configs from every kind of source, typed results, and the
best model's checkpoint found (or refused) from a run or search directory. No Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from orchestrator.api import RunSummary, best_checkpoint
from orchestrator.errors import UserError
from orchestrator.start.config_file import load_config
from workers.contract.config import RunConfig

BASE = {"name": "api", "workload": {"entrypoint": "workers.workloads.digits:build"}}


def test_a_config_from_a_mapping_a_runconfig_or_a_builtin_name_is_the_same_config():
    from_mapping = load_config(BASE, {"train.epochs": 3, "scaling.num_workers": 1})
    assert from_mapping.train.epochs == 3 and from_mapping.scaling.num_workers == 1
    again = load_config(from_mapping, ["train.lr=0.01"])  # --set strings, read as YAML
    assert again.train.lr == 0.01 and again.train.epochs == 3
    assert isinstance(load_config("digits"), RunConfig)
    assert from_mapping.to_dict() == RunConfig.model_validate(from_mapping.to_dict()).to_dict()


@pytest.mark.parametrize(("overrides", "field"), [
    ({"train.epochs": 0}, "train.epochs"),
    ({"train.": 1}, "empty part"),
    ({"train.lr": "fast"}, "train.lr"),
])
def test_a_wrong_override_is_one_line_naming_the_field(overrides, field):
    with pytest.raises(UserError) as err:
        load_config(BASE, overrides)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_a_mapping_without_a_workload_is_refused_by_name():
    with pytest.raises(UserError, match="workload"):
        load_config({"name": "x"})


def test_importing_the_api_imports_neither_torch_nor_ray():
    code = ("import sys; from orchestrator import train, tune, load_best; "
            "print(sorted(m for m in ('torch', 'ray', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_run_summary_is_typed_from_the_record():
    record = {"name": "r", "status": "completed", "run_dir": "/x", "monitor": "val_loss",
              "mode": "min", "best_epoch": 3, "best_metrics": {"val_loss": 0.25, "epoch": 3},
              "test_metrics": None, "best_checkpoint": "/x/checkpoint_3",
              "epochs_completed": 5, "history": [{"epoch": 1}]}
    summary = RunSummary.from_record(record)
    assert summary.best_epoch == 3 and summary.best_value == 0.25
    assert summary.record is record and summary.test_metrics is None
    won = {**record, "best_checkpoint": "/x/averaged_top_3", "averaged": {
        "k": 3, "value": 0.2, "best_value": 0.25, "won": True, "path": "/x/averaged_top_3"}}
    assert RunSummary.from_record(won).best_value == 0.2  # the best model's: the average
    lost = {**record, "averaged": {"k": 3, "value": 0.3, "best_value": 0.25, "won": False}}
    assert RunSummary.from_record(lost).best_value == 0.25


def test_best_checkpoint_refuses_a_directory_without_a_record(tmp_path):
    with pytest.raises(UserError, match="no summary.json or leaderboard.json"):
        best_checkpoint(tmp_path)


def test_best_checkpoint_refuses_a_damaged_record_and_a_run_without_a_best(tmp_path):
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        best_checkpoint(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"best_checkpoint": None}))
    with pytest.raises(UserError, match="kept no best model"):
        best_checkpoint(tmp_path)


def test_resume_of_a_run_that_does_not_exist_starts_it_and_says_so(tmp_path):
    from orchestrator.start.context import StartMode, prepare, start_line

    cfg = load_config({**BASE, "storage_path": str(tmp_path / "runs")})
    first = prepare(cfg, resume=True)  # the same command for the first start and restarts
    assert first.start is StartMode.FRESH and first.nothing_to_resume
    run_dir = str(tmp_path / "runs" / "api")
    assert start_line(first) == (f"nothing to resume in {run_dir}: starting a new run 'api' "
                                 "(--resume)")
    plain = prepare(cfg)
    assert not plain.nothing_to_resume
    assert start_line(plain, "search") == f"Starting search 'api' in {run_dir}"


# -- load_best(run, monitor=...): an also-monitor's best model --------------------------------
def _model_checkpoint(run_dir, epoch: int):
    """A checkpoint of the overfit workload's model (its own seed's weights), as the project
    writes one (digests in metadata.json), whose config builds that workload again."""
    import pyarrow.fs as pafs
    import torch

    from tests.workloads.overfit import build
    from workers.checkpoint.snapshot import snapshot
    from workers.checkpoint.writer import write_checkpoint

    params = {"hidden": 8, "with_test": False}
    cfg = load_config({"name": "mon", "workload": {"entrypoint": "tests.workloads.overfit:build",
                                                  "params": params}})
    torch.manual_seed(epoch)
    path = run_dir / f"checkpoint_epoch{epoch:04d}_{epoch}"
    write_checkpoint(snapshot(build(**params).model.state_dict(), None, {"epoch": epoch},
                              {"epoch": epoch, "val_loss": 0.5, "monitor": "val_loss",
                               "mode": "min", "is_best": True, "saved_because": "best",
                               "config": cfg.to_dict()}),
                     pafs.LocalFileSystem(), str(path))
    return str(path)


def _also_monitored_run(tmp_path):
    run_dir = tmp_path / "mon"
    best, accuracy = _model_checkpoint(run_dir, 2), _model_checkpoint(run_dir, 3)
    by_monitor = {"val_accuracy": {"mode": "max", "value": 0.9, "checkpoint": accuracy,
                                   "epoch": 3},
                  "train_loss": {"mode": "min", "value": 0.1, "checkpoint": None, "epoch": 5}}
    (run_dir / "summary.json").write_text(json.dumps({
        "monitor": "val_loss", "best_checkpoint": best, "best_by_monitor": by_monitor}))
    return run_dir, best, accuracy


def test_load_best_takes_an_also_monitors_best_model(tmp_path):
    from orchestrator.api import load_best

    run_dir, best, accuracy = _also_monitored_run(tmp_path)
    assert best_checkpoint(run_dir, monitor="val_accuracy") == accuracy
    assert best_checkpoint(run_dir, monitor="val_loss") == best  # tracker.monitor's
    loaded = load_best(run_dir, monitor="val_accuracy")
    assert loaded.checkpoint == accuracy and loaded.metadata["epoch"] == 3
    from safetensors.torch import load_file

    on_disk = load_file(f"{accuracy}/model.safetensors")
    assert all(t.equal(on_disk[k]) for k, t in loaded.model.state_dict().items())
    assert load_best(run_dir).metadata["epoch"] == 2


@pytest.mark.parametrize(("record", "kwargs", "says"), [
    (None, {"monitor": "val_f1"}, r"summary.json: no best model for monitor 'val_f1'; the "
     r"monitors are val_loss \(tracker.monitor\) and val_accuracy, train_loss "
     r"\(tracker.also_monitor\)$"),
    ({"monitor": "val_loss", "best_checkpoint": "x"}, {"monitor": "val_f1"},
     r"no best model for monitor 'val_f1'; the monitors are val_loss \(tracker.monitor\)$"),
    (None, {"monitor": "train_loss"},
     r"the model of train_loss's best evaluation \(epoch 5\) was not kept"),
    (None, {"monitor": "val_accuracy", "rank": 2}, "pass one of them"),
])
def test_an_unknown_or_unkept_monitor_is_one_line(tmp_path, record, kwargs, says):
    run_dir, _, _ = _also_monitored_run(tmp_path)
    if record is not None:
        (run_dir / "summary.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=says) as refused:
        best_checkpoint(run_dir, **kwargs)
    assert "\n" not in str(refused.value)


def test_rank_1_of_a_search_is_its_best_model(tmp_path):
    best = _model_checkpoint(tmp_path / "search" / "best_model", 4)
    (tmp_path / "search" / "leaderboard.json").write_text(json.dumps(
        {"monitor": "val_loss", "best_model": best}))
    assert best_checkpoint(tmp_path / "search") == best
    assert best_checkpoint(tmp_path / "search", rank=1) == best
    with pytest.raises(UserError, match="rank 2 is out of range; rank 1 is its only"):
        best_checkpoint(tmp_path / "search", rank=2)
