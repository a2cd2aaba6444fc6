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
