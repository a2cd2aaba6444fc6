"""The run config: YAML + ``--set`` -> RunConfig, its plain-dict round trip, and bad input.

Bad input goes through the real CLI in a subprocess: exit code 2, one line on stderr naming
the field or file, no traceback, nothing written and Ray never imported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.errors import UserError
from orchestrator.start.config_file import apply_overrides, load_config, parse_override
from tests.unit.cli_cases import run_in_one_process
from workers.contract.config import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DIGITS = "workers.workloads.digits:build"
MINIMAL = {"storage_path": "./runs", "workload": {"entrypoint": DIGITS}}

DESIGN_EXAMPLE = """\
name: digits-mlp
storage_path: ./runs
seed: 0
workload:
  entrypoint: workers.workloads.digits:build
  params: {hidden: 64}
engine: torch
scaling: {num_workers: 2, use_gpu: auto, cpus_per_worker: 1}
train: {epochs: 20, batch_size: 64, lr: 0.001, optimizer: adam, weight_decay: 0.0}
tracker:
  monitor: val_loss
  mode: auto
  min_delta: 0.0
  patience: null
checkpoint:
  policy: best
  every_n_epochs: 1
  resume_every_n_epochs: 0
failure: {max_failures: 0}
wandb:
  mode: auto
  project: null
  entity: null
  log_model: policy
tune:
  num_samples: 4
  max_concurrent_trials: 2
  scheduler: fifo
  search_space:
    train.lr: {loguniform: [0.0001, 0.01]}
    workload.params.hidden: {choice: [32, 64, 128]}
"""


def write(tmp_path: Path, data: dict[str, Any] | str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --- loading valid files ------------------------------------------------------------------


def test_minimal_file_gets_every_default(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.workload.entrypoint == DIGITS and cfg.workload.params == {}
    assert (cfg.name, cfg.seed, cfg.engine) == ("run", 0, "torch")
    assert (cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.scaling.cpus_per_worker) == (
        2, "auto", 1.0,
    )
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.optimizer) == (
        20, 64, 1e-3, "adam",
    )
    assert (cfg.tracker.monitor, cfg.tracker.mode, cfg.tracker.resolved_mode) == (
        "val_loss", "auto", "min",
    )
    assert cfg.tracker.min_delta == 0.0 and cfg.tracker.patience is None
    assert (cfg.checkpoint.policy, cfg.checkpoint.every_n_epochs) == ("best", 1)
    assert cfg.checkpoint.resume_every_n_epochs == 0
    assert cfg.wandb.mode == "auto" and cfg.wandb.log_model == "policy"


def test_design_example_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, DESIGN_EXAMPLE))
    assert cfg.name == "digits-mlp"
    assert cfg.workload.params == {"hidden": 64}
    assert cfg.tune.search_space["train.lr"] == {"loguniform": [0.0001, 0.01]}
    assert cfg.tune.search_space["workload.params.hidden"] == {"choice": [32, 64, 128]}


@pytest.mark.parametrize("name", ["digits.yaml", "breast_cancer.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(REPO_ROOT / "configs" / name)
    assert cfg.workload.entrypoint.startswith("workers.workloads.")


def test_empty_params_and_comments(tmp_path: Path) -> None:
    text = "# a comment\nworkload:\n  entrypoint: workers.workloads.digits:build  # inline\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.workload.params == {}


def test_workload_module_next_to_the_command(tmp_path: Path, monkeypatch) -> None:
    # A user's own module in the working directory, not importing this project.
    (tmp_path / "my_task_for_config_test.py").write_text(textwrap.dedent("""\
        def build(width=3, depth=1):
            raise AssertionError("load_config must not build the workload")
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_task_for_config_test", raising=False)
    cfg = load_config(write(tmp_path, {"workload": {
        "entrypoint": "my_task_for_config_test:build", "params": {"width": 5},
    }}))
    sys.modules.pop("my_task_for_config_test", None)
    assert cfg.workload.params == {"width": 5}


# --- --set overrides ----------------------------------------------------------------------

BASE = deep_merge(MINIMAL, {
    "workload": {"params": {"hidden": 64, "dropout": 0.25}},
    "train": {"epochs": 12, "lr": 0.01},
})


@pytest.mark.parametrize(
    ("overrides", "attribute", "expected"),
    [
        (["train.lr=0.5"], "train.lr", 0.5),
        (["train.lr=0.5"], "train.epochs", 12),  # siblings in the file are kept
        (["train.lr=1e-3"], "train.lr", 0.001),  # YAML 1.1 reads 1e-3 as a string: coerced
        (["train.epochs=3"], "train.epochs", 3),
        (["train.epochs=3", "train.epochs=4"], "train.epochs", 4),  # the last one wins
        (["train.optimizer=sgd"], "train.optimizer", "sgd"),
        (["train.precision=bf16"], "train.precision", "bf16"),
        (["scaling.use_gpu=false"], "scaling.use_gpu", False),
        (["scaling.use_gpu=true"], "scaling.use_gpu", True),
        (["scaling.use_gpu=auto"], "scaling.use_gpu", "auto"),
        (["scaling.cpus_per_worker=0.5"], "scaling.cpus_per_worker", 0.5),
        (["scaling.num_workers=[1, 4]"], "scaling.num_workers", [1, 4]),
        (["scaling.num_workers=[1, 4]"], "scaling.min_workers", 1),
        (["scaling.num_workers=[1, 4]"], "scaling.max_workers", 4),
        (["scaling.num_workers=[1, 4]"], "scaling.elastic", True),
        (["scaling.num_workers=[3, 3]"], "scaling.num_workers", 3),  # not elastic at all
        (["scaling.num_workers=3"], "scaling.elastic", False),
        (["tracker.patience=4"], "tracker.patience", 4),
        (["tracker.patience=null"], "tracker.patience", None),
        (["tracker.monitor=val_accuracy"], "tracker.resolved_mode", "max"),
        (["tracker.monitor=val_accuracy", "tracker.mode=min"], "tracker.resolved_mode", "min"),
        (["checkpoint.policy=every_n", "checkpoint.every_n_epochs=3"],
         "checkpoint.every_n_epochs", 3),
        (["wandb.project=my-project"], "wandb.project", "my-project"),
        (["name=other-run"], "name", "other-run"),
        (["name=a=b"], "name", "a=b"),  # only the first '=' separates
        (["seed=7"], "seed", 7),
        (["workload.params.hidden=32"], "workload.params", {"hidden": 32, "dropout": 0.25}),
        (["workload.params.dropout=0.5"], "workload.params", {"hidden": 64, "dropout": 0.5}),
        (["workload.params={hidden: 8}"], "workload.params", {"hidden": 8}),
        (["workload.params.split_seed=3", "workload.params.hidden=16"], "workload.params",
         {"hidden": 16, "dropout": 0.25, "split_seed": 3}),
        (["failure.max_failures=-1"], "failure.max_failures", -1),
        (["tune.search_space={}"], "tune.search_space", {}),
        # YAML 1.2 floats everywhere, also where no schema coerces them (free-form params).
        (["workload.params.dropout=1e-3"], "workload.params", {"hidden": 64, "dropout": 0.001}),
        (["name=2024"], "name", "2024"),
    ],
)
def test_set_overrides(tmp_path: Path, overrides: list[str], attribute: str, expected: Any) -> None:
    value: Any = load_config(write(tmp_path, BASE), overrides)
    for part in attribute.split("."):
        value = getattr(value, part)
    assert value == expected
    assert type(value) is type(expected)


def test_set_creates_missing_sections(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"workload": {"entrypoint": "x:y"}}),
                      [f"workload.entrypoint={DIGITS}", "tracker.patience=3",
                       "tracker.min_delta=0.01"])
    assert cfg.workload.entrypoint == DIGITS and cfg.tracker.min_delta == 0.01


def test_set_overrides_and_adds_search_space_keys(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, DESIGN_EXAMPLE), [
        "tune.search_space.train.lr={loguniform: [0.001, 0.1]}",
        "tune.search_space.train.batch_size={choice: [16, 32]}"])
    assert cfg.tune.search_space == {"train.lr": {"loguniform": [0.001, 0.1]},
                                     "workload.params.hidden": {"choice": [32, 64, 128]},
                                     "train.batch_size": {"choice": [16, 32]}}
    # The Python API's mapping of overrides reads its keys the same way.
    cfg = load_config(write(tmp_path, DESIGN_EXAMPLE),
                      {"tune.search_space.train.lr": {"choice": [0.01]}})
    assert cfg.tune.search_space["train.lr"] == {"choice": [0.01]}


def test_keys_whose_partner_uses_them_load(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, deep_merge(MINIMAL, {
        "train": {"schedule": "step", "step_size": 5, "step_gamma": 0.5},
        "checkpoint": {"policy": "every_n", "every_n_epochs": 2},
        "scaling": {"strategy": "fsdp", "fsdp_blocks": ["Linear"]},
        "tracker": {"patience": 3, "min_delta": 0.01},
        "tune": {"scheduler": "asha", "grace_period": 20, "reduction_factor": 3,
                 "search": "optuna", "startup_trials": 2},
    })))
    assert (cfg.train.step_size, cfg.tune.grace_period, cfg.tune.startup_trials) == (5, 20, 2)
    pbt = load_config(write(tmp_path, deep_merge(MINIMAL, {
        "train": {"epochs": 4}, "tune": {"scheduler": "pbt", "perturbation_interval": 3}})))
    assert pbt.tune.perturbation_interval == 3


def test_set_does_not_touch_the_parsed_file(tmp_path: Path) -> None:
    data = {"train": {"lr": 0.1}}
    assert apply_overrides(data, ["train.lr=0.2"]) == {"train": {"lr": 0.2}}
    assert data == {"train": {"lr": 0.1}}


@pytest.mark.parametrize(
    ("item", "path", "value"),
    [
        ("train.lr=0.01", ["train", "lr"], 0.01),
        ("a=1", ["a"], 1),
        (" a.b =2", ["a", "b"], 2),
        ("a=true", ["a"], True),
        ("a=null", ["a"], None),
        ("a=[1, 2]", ["a"], [1, 2]),
        ("a={x: 1}", ["a"], {"x": 1}),
        ("a='7'", ["a"], "7"),
        ("a=", ["a"], ""),
        ("a=x: y: z", ["a"], "x: y: z"),  # not YAML: the literal string
        ("a=b=c", ["a"], "b=c"),
        # A search-space key is one dotted key: everything after tune.search_space.
        ("tune.search_space.train.lr={loguniform: [0.001, 0.1]}",
         ["tune", "search_space", "train.lr"], {"loguniform": [0.001, 0.1]}),
        ("tune.search_space.workload.params.hidden={choice: [8]}",
         ["tune", "search_space", "workload.params.hidden"], {"choice": [8]}),
        ("tune.search_space={}", ["tune", "search_space"], {}),
        # workload.params keys are keyword arguments (no dots): a path reaches into a mapping.
        ("workload.params.opt.lr=1", ["workload", "params", "opt", "lr"], 1),
    ],
)
def test_parse_override(item: str, path: list[str], value: Any) -> None:
    assert parse_override(item) == (path, value)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["foo"], "--set 'foo': expected KEY=VALUE"),
        (["=1"], "expected KEY=VALUE"),
        (["train.lr.x=1"], "train.lr: Input should be a valid number"),
        (["train=1", "train.lr=0.1"], "--set 'train.lr=0.1': train is a value, not a section"),
        (["train.lrr=0.1"], "train.lrr: unknown key"),
        (["bogus.key=1"], "bogus: unknown key"),
        (["train.lr=.nan"], "train.lr:"),
        (["train.weight_decay=.inf"], "train.weight_decay: must be a finite number"),
        (["tracker.min_delta=.inf"], "tracker.min_delta: must be a finite number"),
        (["scaling.num_workers=0"], "scaling.num_workers: must be at least 1, got 0"),
        (["scaling.num_workers=[2, 1]"], "scaling.num_workers: an elastic range is [min, max]"),
        (["scaling.num_workers=[0, 2]"], "scaling.num_workers: an elastic range is [min, max]"),
        (["scaling.num_workers=[1, 2, 3]"], "scaling.num_workers: an elastic range is"),
    ],
)
def test_bad_overrides_in_process(tmp_path: Path, overrides: list[str], match: str) -> None:
    with pytest.raises(UserError, match=re.escape(match)):
        load_config(write(tmp_path, MINIMAL), overrides)


# --- the plain-dict round trip that crosses into Ray ----------------------------------------

ROUND_TRIP = {
    "minimal": (MINIMAL, []),
    "design_example": (yaml.safe_load(DESIGN_EXAMPLE), []),
    "overridden": (BASE, [
        "scaling.use_gpu=false", "tracker.patience=3", "tracker.mode=max",
        "tracker.monitor=val_mcc", "checkpoint.policy=every_n", "wandb.mode=disabled",
        "workload.params.hidden=16", "name=custom", "scaling.cpus_per_worker=0.5",
        "train.weight_decay=0.0001", "failure.max_failures=-1",
    ]),
}


@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_round_trip_through_a_plain_dict(tmp_path: Path, case: str) -> None:
    data, overrides = ROUND_TRIP[case]
    cfg = load_config(write(tmp_path, data), overrides)
    plain = cfg.to_dict()
    assert RunConfig.model_validate(plain) == cfg
    # What Ray and metadata.json carry is strict JSON.
    via_json = json.loads(json.dumps(plain, allow_nan=False))
    assert via_json == plain
    assert RunConfig.model_validate(via_json) == cfg
    # And written back as a config file, it loads to the same config.
    assert load_config(write(tmp_path, yaml.safe_dump(plain), "again.yaml")) == cfg


# --- bad input through the real CLI -------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    id: str
    config: dict[str, Any] | str | None  # dict: dumped as YAML; str: the file's text
    args: tuple[str, ...] = ()
    names: tuple[str, ...] = ()  # each must appear in the error line
    config_arg: str = "cfg.yaml"
    files: dict[str, str] = field(default_factory=dict)  # extra files next to the config
    in_config: bool = True  # found by loading the config (else: by checking its storage)


def bad(case_id: str, change: dict[str, Any] | None, names: str | tuple[str, ...], *args: str,
        **kw: Any) -> Bad:
    config = deep_merge(MINIMAL, change) if change is not None else MINIMAL
    return Bad(case_id, config, args, (names,) if isinstance(names, str) else names, **kw)


BAD_INPUTS = [
    Bad("missing_file", None, names=("missing.yaml", "not found"), config_arg="missing.yaml"),
    Bad("invalid_yaml", "workload: {entrypoint: [unclosed\nname: x\n", names=("cfg.yaml",)),
    Bad("top_level_list", "- workload\n- train\n", names=("cfg.yaml", "list")),
    Bad("config_is_a_directory", None, names=("cfgdir",), config_arg="cfgdir"),
    Bad("empty_file", "", names=("workload", "required")),
    Bad("missing_workload", {"name": "x", "storage_path": "./runs"},
        names=("workload", "required")),
    bad("unknown_top_level_key", {"optimiser": "adam"}, ("optimiser", "unknown key")),
    bad("unknown_nested_key", {"train": {"lrr": 0.1}}, ("train.lrr", "unknown key")),
    bad("wrong_type", {"train": {"epochs": "ten"}}, ("train.epochs", "ten")),
    bad("negative_lr", {"train": {"lr": -1}}, "train.lr"),
    bad("zero_epochs", {"train": {"epochs": 0}}, "train.epochs"),
    bad("zero_workers", {"scaling": {"num_workers": 0}}, "scaling.num_workers"),
    bad("fsdp_one_worker", {"scaling": {"strategy": "fsdp", "num_workers": 1}},
        ("scaling.strategy", "fsdp", "at least 2", "use ddp")),
    bad("fsdp_with_fastai", {"scaling": {"strategy": "fsdp"}, "engine": "fastai",
                             "workload": {"entrypoint": "workers.workloads.digits_fastai:build"}},
        ("scaling.strategy", "fastai", "use scaling.strategy: ddp")),
    bad("bad_strategy", {"scaling": {"strategy": "zero3"}}, ("scaling.strategy", "zero3")),
    bad("keep_top_k_zero", {"checkpoint": {"keep_top_k": 0}}, "checkpoint.keep_top_k"),
    bad("keep_top_k_without_best", {"checkpoint": {"policy": "all", "keep_top_k": 3}},
        ("checkpoint.keep_top_k", "checkpoint.policy: best")),
    bad("average_more_than_kept", {"checkpoint": {"keep_top_k": 3, "average_top_k": 5}},
        ("checkpoint.average_top_k", "checkpoint.keep_top_k to at least 5")),
    bad("average_of_one", {"checkpoint": {"keep_top_k": 3, "average_top_k": 1}},
        "checkpoint.average_top_k"),
    bad("ema_decay_of_one", {"train": {"ema_decay": 1.0}}, "train.ema_decay"),
    bad("ema_with_fastai", {"train": {"ema_decay": 0.9}, "engine": "fastai",
                            "workload": {"entrypoint": "workers.workloads.digits_fastai:build"}},
        ("train.ema_decay", "engine: torch")),
    bad("also_monitor_is_the_monitor", {"tracker": {"also_monitor": [{"monitor": "val_loss"}]}},
        ("tracker.also_monitor", "'val_loss' is tracker.monitor")),
    bad("also_monitor_bad_mode",
        {"tracker": {"also_monitor": [{"monitor": "val_accuracy", "mode": "up"}]}},
        ("tracker.also_monitor.0.mode", "up")),
    bad("one_worker_trials_unknown", {"tune": {"one_worker_trials": "in_process"}},
        ("tune.one_worker_trials", "in_trial", "ray_train", "in_process")),
    bad("one_worker_trials_a_flag", {"tune": {"one_worker_trials": True}},
        ("tune.one_worker_trials", "in_trial", "ray_train")),
    bad("bad_keep", {"wandb": {"keep": "newest"}}, ("wandb.keep", "newest", "best_and_last")),
    bad("references_on_local_storage", {"wandb": {"model_files": "reference"}},
        ("wandb.model_files", "object store", "use copy")),
    bad("negative_min_delta", {"tracker": {"min_delta": -0.1}}, "tracker.min_delta"),
    bad("bad_policy", {"checkpoint": {"policy": "sometimes"}}, ("checkpoint.policy", "sometimes")),
    bad("bad_mode", {"tracker": {"mode": "up"}}, ("tracker.mode", "up")),
    bad("bad_optimizer", {"train": {"optimizer": "lion"}}, ("train.optimizer", "lion")),
    bad("bad_precision", {"train": {"precision": "fp16"}}, ("train.precision", "fp16", "bf16")),
    bad("bad_use_gpu", {"scaling": {"use_gpu": "maybe"}}, "scaling.use_gpu"),
    bad("entrypoint_without_colon", {"workload": {"entrypoint": "workers.workloads.digits"}},
        "workload.entrypoint"),
    bad("entrypoint_module_missing", {"workload": {"entrypoint": "no_such_module_xyz:build"}},
        ("workload.entrypoint", "no_such_module_xyz")),
    bad("entrypoint_module_raises", {"workload": {"entrypoint": "broken_task:build"}},
        ("workload.entrypoint", "broken_task", "boom"),
        files={"broken_task.py": "raise RuntimeError('boom')\n\ndef build():\n    pass\n"}),
    bad("entrypoint_function_missing",
        {"workload": {"entrypoint": "workers.workloads.digits:no_such_function"}},
        ("workload.entrypoint", "no_such_function")),
    bad("params_not_accepted", {"workload": {"params": {"hiddn": 3}}},
        ("workload.params", "hiddn")),
    bad("params_not_a_mapping", {"workload": {"params": [1, 2]}}, "workload.params"),
    bad("monitor_test_loss", {"tracker": {"monitor": "test_loss"}},
        ("tracker.monitor", "test_loss")),
    bad("name_with_slash", {"name": "a/b"}, "name"),
    bad("patience_zero", {"tracker": {"patience": 0}}, "tracker.patience"),
    bad("set_without_equals", None, "--set 'foo'", "--set", "foo"),
    bad("set_unknown_key", None, ("train.lrr", "unknown key"), "--set", "train.lrr=0.1"),
    bad("set_unknown_section", None, ("optimizer", "unknown key"), "--set", "optimizer.lr=1"),
    bad("set_below_a_value", None, "train.lr", "--set", "train.lr.x=1"),
    bad("set_nan_lr", None, "train.lr", "--set", "train.lr=.nan"),
    bad("set_inf_weight_decay", None, "train.weight_decay", "--set", "train.weight_decay=.inf"),
    bad("set_name_with_slash", None, "name", "--set", "name=../elsewhere"),
    bad("resume_and_overwrite", None, "--overwrite", "--resume", "--overwrite"),
    bad("set_empty_key_part", None, ("--set '.lr=1'", "empty part"), "--set", ".lr=1"),
    bad("empty_storage_path", {"storage_path": ""}, "storage_path"),
    bad("epochs_bool", {"train": {"epochs": True}}, "train.epochs"),
    bad("infinite_cpus_per_worker", {"scaling": {"cpus_per_worker": float("inf")}},
        "scaling.cpus_per_worker"),
    bad("import_error_over_two_lines", {"workload": {"entrypoint": "two_lines:build"}},
        ("workload.entrypoint", "line one"),
        files={"two_lines.py": "raise RuntimeError('line one\\nline two')\n"}),
    bad("unknown_option", None, "--bogus", "--bogus"),
    # Never delete what is not ours: a directory without the run marker, or one holding the
    # working directory, is refused before anything starts; its files stay.
    bad("overwrite_not_a_run", {"storage_path": "./x", "name": "important"},
        ("--overwrite", "x/important", "not created by this tool"), "--overwrite",
        files={"x/important/thesis.txt": "years of work\n"}),
    bad("overwrite_the_working_directory", {"storage_path": "..",
                                            "name": "overwrite_the_working_directory"},
        ("--overwrite", "holds the working directory"), "--overwrite"),
    bad("overwrite_a_copied_marker_above_cwd", {"storage_path": "..",
                                                "name": "overwrite_a_copied_marker_above_cwd"},
        ("--overwrite", "holds the working directory"), "--overwrite",
        files={".orchestrator-run.json": "{}"}),
    bad("storage_path_is_a_file", {"storage_path": "./notes.txt"},
        ("storage_path", "notes.txt", "is a file"), files={"notes.txt": "mine\n"}),
    bad("storage_path_below_a_file", {"storage_path": "./notes.txt/runs"},
        ("storage_path", "notes.txt", "is a file"), files={"notes.txt": "mine\n"}),
    bad("storage_path_unknown_scheme", {"storage_path": "foo://bucket/runs"},
        ("storage_path", "unknown scheme 'foo'", "s3://")),
    bad("storage_unreachable",
        {"storage_path": "s3://bucket/x?endpoint_override=127.0.0.1:9&scheme=http"
                         "&region=us-east-1"},
        ("storage_path", "cannot be reached"), in_config=False),
    bad("resume_damaged_history", {"storage_path": "./runs", "name": "r"},
        ("--resume", "history.json is damaged"), "--resume",
        files={"runs/r/.orchestrator-run.json": "{}\n", "runs/r/history.json": '{"hist'}),
    bad("run_in_use", {"storage_path": "./runs", "name": "r"},
        ("runs/r is in use by a running driver", "pid 1 on"), "--resume",
        files={"runs/r/.orchestrator-run.json": "{}\n",
               "runs/r/.orchestrator-lock.json": json.dumps(
                   {"pid": 1, "host": socket.gethostname(), "started": "10:00"})}),
    bad("resume_not_a_run", {"storage_path": "./x", "name": "important"},
        ("--resume", "x/important", "not a run or search"), "--resume",
        files={"x/important/thesis.txt": "years of work\n"}),
    # Issue 37: what Ray Tune's schedulers assert, said as the key (before: Ray's traceback).
    bad("asha_grace_period_past_the_run",
        {"train": {"epochs": 3}, "tune": {"scheduler": "asha", "grace_period": 5}},
        ("tune.grace_period", "train.epochs: 3", "at most 3")),
    bad("pbt_interval_not_shorter_than_the_run", {"train": {"epochs": 2},
                                                 "tune": {"scheduler": "pbt"}},
        ("tune.perturbation_interval", "train.epochs: 2", "at most 1")),
    bad("asha_infinite_reduction_factor",
        {"tune": {"scheduler": "asha", "reduction_factor": float("inf")}},
        "tune.reduction_factor"),
    # A URI missing a slash would train into a local folder named 's3:'.
    bad("storage_path_one_slash", {"storage_path": "s3:/bucket/runs"},
        ("storage_path", "'s3://bucket/runs'")),
    bad("storage_path_no_slash", {"storage_path": "gs:bucket/runs"},
        ("storage_path", "'gs://bucket/runs'")),
    # gs:// without credentials: Arrow's GCS client retries for minutes; answered in seconds.
    bad("storage_gs_without_credentials", {"storage_path": "gs://bucket/runs"},
        ("storage_path", "gs://bucket/runs/run cannot be reached"), in_config=False),
    Bad("duplicate_key", f"workload:\n  entrypoint: {DIGITS}\ntrain:\n  lr: 0.1\n  epochs: 3\n"
        "  lr: 0.2\n", names=("cfg.yaml", "train.lr given twice", "lines 4 and 6")),
    Bad("duplicate_key_in_a_flow_mapping", f"workload: {{entrypoint: {DIGITS}, params: {{}}, "
        "params: {hidden: 3}}\n", names=("cfg.yaml", "workload.params given twice", "line 1")),
    # Keys that only one value of another key uses, given with another: they would do nothing.
    bad("step_size_without_step_schedule", {"train": {"step_size": 10}},
        ("train.step_size", "train.schedule step", "train.schedule is auto")),
    bad("step_gamma_without_step_schedule", {"train": {"schedule": "cosine", "step_gamma": 0.5}},
        ("train.step_gamma", "train.schedule is cosine")),
    bad("every_n_epochs_without_every_n", {"checkpoint": {"every_n_epochs": 5}},
        ("checkpoint.every_n_epochs", "checkpoint.policy every_n", "checkpoint.policy is best")),
    bad("fsdp_blocks_without_fsdp", {"scaling": {"fsdp_blocks": ["Linear"]}},
        ("scaling.fsdp_blocks", "scaling.strategy fsdp", "scaling.strategy is ddp")),
    bad("find_unused_parameters_under_fsdp",
        {"scaling": {"strategy": "fsdp", "find_unused_parameters": True}},
        ("scaling.find_unused_parameters", "scaling.strategy is fsdp")),
    bad("min_delta_without_patience", {"tracker": {"min_delta": 0.01}},
        ("tracker.min_delta", "tracker.patience is null")),
    bad("startup_trials_without_optuna", {"tune": {"startup_trials": 3}},
        ("tune.startup_trials", "tune.search optuna", "tune.search is random")),
    bad("grace_period_without_asha", {"tune": {"grace_period": 3}},
        ("tune.grace_period", "tune.scheduler asha", "tune.scheduler is fifo")),
    bad("reduction_factor_without_asha", {"tune": {"scheduler": "pbt", "reduction_factor": 3}},
        ("tune.reduction_factor", "tune.scheduler is pbt")),
    bad("perturbation_interval_without_pbt", {"tune": {"perturbation_interval": 3}},
        ("tune.perturbation_interval", "tune.scheduler pbt")),
    # W&B's own rule for project names, said as the key (before: blamed on wandb.mode).
    bad("wandb_project_with_slash", {"wandb": {"project": "team/digits"}},
        ("wandb.project", "cannot contain", "found /")),
    bad("wandb_project_from_the_name", {"name": "digits:v2"},
        ("wandb.project", "'digits:v2'", "found :")),
]

# If anything imports Ray while rejecting a config, this stand-in is found first: it leaves a
# marker file and fails the import. (Not a mock: no test here wants Ray to do anything.)
RAY_GUARD = """\
import os
open(os.environ["RAY_GUARD_MARKER_DIR"] + "/" + os.environ["RAY_GUARD_CASE"], "w").close()
raise ImportError("Ray was imported while rejecting a bad config")
"""


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    created: set[str]  # entries of the case's directory that the CLI added
    ray_imported: bool
    files_kept: bool  # the case's own files are all there, unchanged


def cli_env(guard: Path, markers: Path, case_id: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(guard), str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env.update(PYTHONDONTWRITEBYTECODE="1", RAY_GUARD_MARKER_DIR=str(markers),
               RAY_GUARD_CASE=case_id)
    return env


def prepare(case: Bad, root: Path) -> tuple[Path, set[str]]:
    """The case's directory under ``root``, with its files; and what it holds before."""
    cwd = root / case.id
    cwd.mkdir(parents=True)
    if isinstance(case.config, dict):
        (cwd / case.config_arg).write_text(yaml.safe_dump(case.config))
    elif isinstance(case.config, str):
        (cwd / case.config_arg).write_text(case.config)
    if case.config_arg == "cfgdir":
        (cwd / "cfgdir").mkdir()
    for name, text in case.files.items():
        (cwd / name).parent.mkdir(parents=True, exist_ok=True)
        (cwd / name).write_text(text)
    return cwd, set(os.listdir(cwd))


def result_of(case: Bad, cwd: Path, before: set[str], markers: Path, returncode: int,
              stdout: str, stderr: str) -> CliResult:
    kept = all((cwd / name).is_file() and (cwd / name).read_text() == text
               for name, text in case.files.items())
    return CliResult(returncode, stdout, stderr, set(os.listdir(cwd)) - before,
                     (markers / case.id).exists(), kept)


def argv(case: Bad) -> list[str]:
    return ["train", case.config_arg, *case.args]


def run_bad_input(case: Bad, root: Path, guard: Path, markers: Path) -> CliResult:
    """``python -m orchestrator train ...`` in a process of its own."""
    cwd, before = prepare(case, root)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", *argv(case)],
        cwd=cwd, env=cli_env(guard, markers, case.id), capture_output=True, text=True,
        timeout=120,
    )
    return result_of(case, cwd, before, markers, proc.returncode, proc.stdout, proc.stderr)


def run_all_in_one_process(cases: list[Bad], root: Path, guard: Path,
                           markers: Path) -> dict[str, CliResult]:
    """The same CLI calls, one after another in one process (``tests/unit/cli_cases.py``)."""
    prepared = {case.id: prepare(case, root) for case in cases}
    spec: list[dict[str, object]] = [
        {"id": case.id, "cwd": str(prepared[case.id][0]), "argv": argv(case),
         "env": {"RAY_GUARD_CASE": case.id}} for case in cases]
    outputs = run_in_one_process(spec, str(root), cli_env(guard, markers, "_runner"))
    return {case.id: result_of(case, *prepared[case.id], markers, **outputs[case.id])
            for case in cases}


# The cases that also run as ``python -m orchestrator`` processes of their own: the test
# below holds their in-process results equal to these, so the shared process hides nothing.
# The two object stores that do not answer run only so: they wait seconds for the probe,
# which runs beside the others there.
OWN_PROCESS = ("missing_file", "set_without_equals", "import_error_over_two_lines",
               "overwrite_not_a_run", "resume_damaged_history")
OWN_PROCESS_ONLY = ("storage_unreachable", "storage_gs_without_credentials")


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, CliResult]]:
    """Every bad input through the CLI: all in one process (``in_one``), and some in
    processes of their own (``own``), those beside the one."""
    root = tmp_path_factory.mktemp("bad_inputs")
    guard, markers = root / "_guard", root / "_markers"
    (guard / "ray").mkdir(parents=True)
    (guard / "ray" / "__init__.py").write_text(RAY_GUARD)
    markers.mkdir()
    # The guard itself must work, or "Ray was never imported" would prove nothing.
    check = subprocess.run([sys.executable, "-c", "import ray"], cwd=root, capture_output=True,
                           env=cli_env(guard, markers, "_self_check"), timeout=60)
    assert check.returncode != 0 and (markers / "_self_check").exists()
    by_id = {c.id: c for c in BAD_INPUTS}
    own = [by_id[case_id] for case_id in OWN_PROCESS_ONLY + OWN_PROCESS]  # the waits first
    (markers / "in_one").mkdir()
    # All at once: the stores' probes wait most of their seconds, the rest import.
    with ThreadPoolExecutor(max_workers=len(own) + 1) as pool:
        in_one = pool.submit(run_all_in_one_process,
                             [c for c in BAD_INPUTS if c.id not in OWN_PROCESS_ONLY],
                             root / "in_one", guard, markers / "in_one")
        futures = {c.id: pool.submit(run_bad_input, c, root / "own", guard, markers)
                   for c in own}
        return {"in_one": in_one.result(),
                "own": {case_id: future.result() for case_id, future in futures.items()}}


def test_bad_inputs_are_distinct_and_many() -> None:
    ids = [c.id for c in BAD_INPUTS]
    assert len(set(ids)) == len(ids) >= 18


@pytest.mark.parametrize(
    "case", [c for c in BAD_INPUTS
             if isinstance(c.config, dict) and not (c.args or c.files) and c.in_config],
    ids=lambda c: c.id,
)
def test_bad_files_in_process(tmp_path: Path, case: Bad) -> None:
    # The same files without a subprocess (MINIMAL itself loads: see the first test above).
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path, case.config))  # type: ignore[arg-type]
    for name in case.names:
        assert name in str(info.value)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c.id)
def test_bad_input_is_one_line_and_exit_2(cli_results: dict[str, dict[str, CliResult]],
                                          case: Bad) -> None:
    result = cli_results["in_one"].get(case.id) or cli_results["own"][case.id]
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, output
    assert result.returncode == 2, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("error: "), output
    for name in case.names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    assert result.stdout == "", output
    assert not result.ray_imported, "Ray was imported"
    assert result.created == set(), f"the CLI wrote {sorted(result.created)}"
    assert result.files_kept, "the CLI changed or deleted the user's files"


@pytest.mark.parametrize("case_id", OWN_PROCESS)
def test_a_case_reads_the_same_in_a_process_of_its_own(
        cli_results: dict[str, dict[str, CliResult]], case_id: str) -> None:
    """What the shared process printed, wrote and imported is what ``python -m orchestrator``
    alone does (its exit code, both streams to the byte, the files)."""
    in_one = cli_results["in_one"][case_id]
    # The case's directory is <root>/in_one/<case> there, <root>/own/<case> here.
    moved = {name: getattr(in_one, name).replace("/in_one/", "/own/")
             for name in ("stdout", "stderr")}
    assert dataclasses.replace(in_one, **moved) == cli_results["own"][case_id]


def test_a_sections_own_check_names_its_key_once():
    """A check of a whole section (``tracker``) names the key it refuses, and the line says
    it once: ``tracker.also_monitor: ...``, not ``tracker: tracker.also_monitor: ...``."""
    with pytest.raises(UserError) as refused:
        load_config({**MINIMAL, "tracker": {"also_monitor": [{"monitor": "val_loss"}]}})
    assert str(refused.value) == ("tracker.also_monitor: 'val_loss' is tracker.monitor; give "
                                  "each metric once")
