"""Ray Datasets streamed to the workers: the built-in Parquet digits through the CLI (on local
disk and on a real S3-compatible server), workloads that collate rows themselves, a worker
SIGKILLed mid-epoch, fsdp, and the mistakes users make with them.

The validation split has 1,001 rows for 2 workers: the saved best, re-scored in one process
over the whole validation and test sets, must equal the record to 1e-6, which it can only do
if every row was counted exactly once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from ray.util.state import list_actors, list_tasks

from orchestrator import train
from orchestrator.errors import UserError
from tests.integration.conftest import (
    REPO,
    S3_BUCKET,
    S3_CREDENTIALS,
    assert_close,
    own_state_api,
    run_cli,
)
from workers.contract.config import RunConfig
from workers.loop.scoring import evaluate_split

pytestmark = pytest.mark.integration
VAL_ROWS, TEST_ROWS = 1001, 201  # of 1,797: 595 training rows, 297 a worker, 5 steps of 64
BUCKET, CREDENTIALS = S3_BUCKET, S3_CREDENTIALS
STREAMED = "tests.workloads.streamed:build"


@pytest.fixture(scope="module", autouse=True)
def aws_credentials():
    """Before the module's Ray starts (autouse: before ``ray_local``): its workers read S3."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in CREDENTIALS.items():
            patch.setenv(key, value)
        yield


def parquet_config(tmp_path: Path, name: str, data_dir: str, epochs: int,
                   **extra: object) -> Path:
    """The built-in ``configs/digits_parquet.yaml`` with a 1,001-row validation split."""
    cfg = yaml.safe_load((REPO / "configs/digits_parquet.yaml").read_text())
    cfg.update(name=name, storage_path=str(tmp_path / "runs"))
    cfg["workload"]["params"].update(data_dir=data_dir, val_rows=VAL_ROWS, test_rows=TEST_ROWS)
    cfg["train"]["epochs"] = epochs
    cfg["wandb"] = {"mode": "disabled"}
    for key, value in extra.items():
        section, _, field = key.partition("__")
        cfg.setdefault(section, {})[field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cli(tmp_path: Path, config: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), **CREDENTIALS}
    env.pop("RAY_ADDRESS", None)
    # A streamed epoch runs Ray Data pipelines whose tasks need worker processes that Ray may
    # have to start: under a full suite's load (two test files at a time on two cores) a
    # 3-epoch run with a restart took over 7 minutes (the runs here have 2).
    done = run_cli(["train", str(config), *extra], cwd=tmp_path, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / config.stem / "summary.json").read_text())
    summary["_stdout"] = done.stdout
    return summary


def assert_rescored(summary: dict) -> None:
    """The best epoch is the history's best, and its saved weights, scored in this process
    over the whole validation and test sets, are the record."""
    history = summary["history"]
    assert summary["best_epoch"] == min(history, key=lambda r: r["val_loss"])["epoch"]
    cfg = RunConfig.model_validate(summary["config"])
    for split, recorded in (("val", summary["best_metrics"]), ("test", summary["test_metrics"])):
        rescored = evaluate_split(cfg, summary["best_checkpoint"], split)
        assert set(rescored) <= set(recorded)
        for key, value in rescored.items():
            assert_close(value, recorded[key])
    # Every validation row counted once: the accuracy is k / 1001 for every epoch.
    for record in history:
        correct = record["val_accuracy"] * VAL_ROWS
        assert abs(correct - round(correct)) < 1e-6, record


def test_parquet_on_s3_and_on_disk_through_the_cli_exact_and_a_killed_worker_changes_nothing(
        tmp_path, s3_server, ray_local):
    """The reference run reads the Parquet files from the S3 server; the second run reads the
    same files from local disk, and one of its workers SIGKILLs its own process mid-epoch."""
    full_state = {"checkpoint__resume_every_n_epochs": 1}  # a restart resumes the optimizer
    uri = (f"s3://{BUCKET}/digits?endpoint_override=127.0.0.1:{s3_server['port']}"
           "&scheme=http&region=us-east-1")
    reference = train_cli(tmp_path, parquet_config(tmp_path, "on-s3", uri, 2, **full_state))
    keys = {o["Key"] for o in s3_server["client"].list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert any(k.endswith("/val/part-003.parquet") for k in keys), keys
    assert reference["status"] == "completed" and reference["epochs_completed"] == 2
    assert [r["step"] for r in reference["history"]] == [5] * 2  # 297 rows a worker
    assert_rescored(reference)

    # A worker SIGKILLs its own process at its 7th training batch (epoch 2, batch 2): Ray
    # restarts the workers from epoch 1's checkpoint, and the streams replay epoch 2 as it was.
    marker = tmp_path / "killed.pid"
    config = parquet_config(tmp_path, "killed", str(tmp_path / "data"), 2,
                            failure__max_failures=1, **full_state)
    killed = train_cli(tmp_path, config,
                       "--set", f"workload.entrypoint={STREAMED}",
                       "--set", "workload.params.kill_after_steps=6",
                       "--set", f"workload.params.marker={marker}")
    assert marker.exists(), "no worker was killed"
    assert "a worker failed" in killed["_stdout"], killed["_stdout"]
    assert any((tmp_path / "data").rglob("*.parquet"))
    assert killed["best_epoch"] == reference["best_epoch"]
    assert len(killed["history"]) == len(reference["history"])
    for got, expected in zip(killed["history"], reference["history"], strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy", "val_mcc"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6), (key, got, expected)
    assert_rescored(killed)


def api_config(tmp_path: Path, name: str, **params: object) -> dict:
    return {"name": name, "storage_path": str(tmp_path / "runs"), "seed": 0,
            "workload": {"entrypoint": STREAMED,
                         "params": {"data_dir": str(tmp_path.parent / "data"),
                                    "val_rows": VAL_ROWS, "test_rows": TEST_ROWS, **params}},
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
            "train": {"epochs": 3, "batch_size": 64, "lr": 0.01},
            "wandb": {"mode": "disabled"}}


def test_rows_collated_by_the_workload_under_fsdp(tmp_path, ray_local):
    """A collate_fn over the column arrays returning a mapping batch, into a BatchNorm model
    with dropout, under fsdp, every split through Ray Data's stream
    (``workload.ray_data_streaming``, not read by the workers themselves): Ray Train's
    ``streaming_split`` gives each worker its share of the validation blocks, and a worker
    whose validation stream ended makes padding forwards until every worker's has."""
    cfg = api_config(tmp_path, "mapping-fsdp", shape="mapping", batchnorm=True,
                     ray_data_streaming=True)
    cfg["scaling"]["strategy"] = "fsdp"
    cfg["train"]["epochs"] = 2
    before = footer_readers_and_listings()
    summary = train(cfg).record
    assert summary["status"] == "completed"
    assert [r["step"] for r in summary["history"]] == [5] * 2  # 297 rows a worker
    # On this local one-node Ray, the run's Ray Data read Parquet footers with one actor
    # process at each listing of a split's files, not a pool of them.
    readers, listings = (now - then for now, then in
                         zip(footer_readers_and_listings(), before, strict=True))
    assert 0 < len(readers) <= len(listings), (len(readers), len(listings))
    assert_rescored(summary)


def footer_readers_and_listings() -> tuple[set[str], set[str]]:
    """The ids of every Parquet footer reader actor that got a process, and of every file
    listing task, that this module's Ray has had so far (its state API)."""
    readers = list_actors(address=own_state_api(), detail=True, limit=10_000,
                          filters=[("class_name", "=", "FooterReader")])
    listings = list_tasks(address=own_state_api(), limit=10_000,
                          filters=[("name", "=", "ListFiles")])
    return ({a.actor_id for a in readers if a.pid},
            {f"{t.task_id}/{t.attempt_number}" for t in listings})


MISTAKES = [
    ({"mistake": "missing_column"}, {},
     "workload.train_dataset: no column 'digit' (its columns: pixels, label)"),
    ({"mistake": "empty_split"}, {}, "workload.val_dataset: the Ray Dataset has no rows"),
    ({"mistake": "strings"}, {}, "workload.train_dataset: column 'pixels' cannot become a tensor"),
    ({"mistake": "no_labels"}, {},
     "workload.label_key: train_dataset's first batch is a mapping without the label key "
     "'labels'"),
    ({}, {"engine": "fastai"}, "engine: fastai trains map-style datasets, and "
     "workload.train_dataset, workload.val_dataset, workload.test_dataset are Ray Datasets"),
    ({}, {"scaling": {"num_workers": 2, "cpus_per_worker": 1}},
     "scaling.cpus_per_worker: 2 workers x 1 CPU take 2 of the cluster's 2 CPUs"),
]


def test_mistakes_are_one_line_before_training_and_leave_nothing(tmp_path, ray_local):
    for index, (params, sections, message) in enumerate(MISTAKES):
        cfg = {**api_config(tmp_path, f"mistake-{index}", **params), **sections}
        with pytest.raises(UserError) as caught:
            train(cfg)
        assert str(caught.value).startswith(message), str(caught.value)
        assert "\n" not in str(caught.value)
        assert not (tmp_path / "runs" / f"mistake-{index}").exists()


def test_a_mistake_through_the_cli_exits_2_with_one_line(tmp_path):
    config = parquet_config(tmp_path, "bad-column", str(tmp_path / "data"), 2)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    done = run_cli(["train", str(config), "--set", f"workload.entrypoint={STREAMED}",
                    "--set", "workload.params.mistake=missing_column"],
                   cwd=tmp_path, env=env, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "workload.train_dataset: no column 'digit'" in last, done.stderr[-3000:]
    assert not (tmp_path / "runs" / "bad-column").exists()


def test_plain_parquet_splits_are_read_by_the_workers_anything_else_by_ray_data(tmp_path,
                                                                                 ray_local):
    """Which splits the workers read themselves (``loop.parquet_shards.parquet_split``, from
    the Dataset's logical plan and the files' footers) and which stream through Ray Data."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from orchestrator.training.datasets import ray_datasets_of
    from tests.workloads.streamed import build
    from workers.loop.parquet_shards import parquet_split

    cfg = RunConfig.model_validate(api_config(tmp_path, "paths"))
    workload = build(str(tmp_path.parent / "data"), val_rows=VAL_ROWS, test_rows=TEST_ROWS)
    found = ray_datasets_of(cfg, workload)
    assert found is not None and set(found.parquet) == {"train", "val"}
    assert set(found.trainer_options()["datasets"]) == {"test"}  # scored in one task
    assert found.parquet["val"].rows == VAL_ROWS
    assert found.parquet["train"].columns == ("pixels", "label")  # the named columns only

    train_ds = workload.train_dataset
    rows = train_ds.count()
    assert parquet_split(workload, train_ds.select_columns(["label"]), rows) is not None
    where = str(Path(found.parquet["train"].files[0]).parent)
    for other in (train_ds.map_batches(lambda b: b), train_ds.filter(lambda r: True),
                  train_ds.limit(10), train_ds.random_shuffle(),
                  ray.data.read_parquet(where, shuffle="files"),
                  ray.data.read_parquet(where, include_paths=True),
                  ray.data.from_items([{"pixels": [1.0], "label": 1}])):
        assert parquet_split(workload, other, rows) is None, other
    assert parquet_split(workload, train_ds, rows + 1) is None  # footers disagree: Ray's
    forced = build(str(tmp_path.parent / "data"), val_rows=VAL_ROWS, test_rows=TEST_ROWS,
                   ray_data_streaming=True)
    assert ray_datasets_of(cfg, forced).parquet == {}
    # A column of strings streams through Ray Data unless the workload leaves it out.
    (tmp_path / "strings").mkdir()
    pq.write_table(pa.table({"x": [1.0, 2.0], "name": ["a", "b"]}),
                   tmp_path / "strings" / "p.parquet")
    strings = ray.data.read_parquet(str(tmp_path / "strings"))
    unnamed = type("W", (), {})()
    assert parquet_split(unnamed, strings, 2) is None
    assert parquet_split(unnamed, strings.select_columns(["x"]), 2) is not None
