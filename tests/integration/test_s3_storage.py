"""storage_path on S3: a real S3-compatible server on loopback (moto's server mode).

The run writes checkpoints, history and summary through pyarrow's S3 filesystem; the test
reads them back through the S3 API (boto3), as a user on another machine would. The runs that
need no process of their own share the module's Ray (started with the credentials in its
environment, so that its workers have them); the outage, whose last line the user reads,
runs the CLI, and first: before the module's Ray starts, so no second local Ray runs beside
the one the CLI starts.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load

from orchestrator.start.config_file import apply_overrides, read_yaml
from orchestrator.training.driver import run_training
from tests.integration.conftest import (
    REPO,
    S3_BUCKET,
    S3_CREDENTIALS,
    assert_close,
    free_port,
    overfit_config,
    wait_for,
)
from tests.integration.outage import Outage
from workers.contract.config import RunConfig
from workers.loop.metric_setup import workload_metrics
from workers.loop.scoring import evaluate_dataset
from workers.workloads.digits import build as build_digits

pytestmark = pytest.mark.integration
BUCKET, CREDENTIALS = S3_BUCKET, S3_CREDENTIALS


@pytest.fixture(scope="module", autouse=True)
def aws_credentials():
    """In the environment before the module's Ray starts (autouse: before ``ray_local``):
    its workers write the checkpoints."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in CREDENTIALS.items():
            patch.setenv(key, value)
        yield


def test_object_store_down_during_uploads_then_resume(s3_server, tmp_path):
    """The endpoint goes away mid-run (connections refused, open ones cut) and stays away
    until the run gave up; it comes back with everything it held, and --resume continues."""
    proxy = Outage(s3_server["port"], free_port())
    uri = (f"s3://{BUCKET}/outage?endpoint_override=127.0.0.1:{proxy.port}&scheme=http"
           "&region=us-east-1")
    cfg = overfit_config(tmp_path, name="outage", storage_path=uri, test_split=True,
                         train={"epochs": 6},
                         failure={"max_failures": 2}, checkpoint={"resume_every_n_epochs": 1})
    (tmp_path / "run.yaml").write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, **s3_server["env"], "PYTHONPATH": str(REPO),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"}
    command = [sys.executable, "-m", "orchestrator", "train", "run.yaml"]
    client = s3_server["client"]

    def history() -> list[dict]:
        """The run's records so far, through the S3 API: history.json (what was compacted),
        then each segment written since (``orchestrator.results.history``)."""
        records, through = [], 0
        try:
            body = client.get_object(Bucket=BUCKET, Key="outage/outage/history.json")["Body"]
            compacted = json.loads(body.read())
            records, through = compacted["history"], compacted.get("segments_through", 0)
        except client.exceptions.NoSuchKey:
            pass
        listing = client.list_objects_v2(Bucket=BUCKET, Prefix="outage/outage/history/")
        for item in sorted(listing.get("Contents", []), key=lambda o: o["Key"]):
            name = item["Key"].rsplit("/", 1)[1]  # "" for the folder's own marker object
            if name.endswith(".json") and int(name.removesuffix(".json")) > through:
                body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"]
                records += json.loads(body.read())["records"]
        return records

    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(history()) >= 2 or proc.poll() is not None, 240, "epoch 2")
    proxy.down()
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proxy.up()
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: training failed: OSError: ") and "Could not connect" in last
    assert last.endswith("; continue with: orchestrator train run.yaml --resume"), last
    stopped_at = len(history())

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    summary = json.loads(client.get_object(Bucket=BUCKET, Key="outage/outage/summary.json")
                         ["Body"].read())
    # Nothing lost: every epoch once, the first ones as they were, the best the best of all.
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 7))
    assert stopped_at >= 2
    losses = [h["val_loss"] for h in summary["history"]]
    assert summary["best_epoch"] == losses.index(min(losses)) + 1
    best_key = summary["best_checkpoint"].split("?")[0].removeprefix(f"s3://{BUCKET}/")
    metadata = json.loads(client.get_object(Bucket=BUCKET, Key=f"{best_key}/metadata.json")
                          ["Body"].read())
    blob = client.get_object(Bucket=BUCKET, Key=f"{best_key}/model.safetensors")["Body"].read()
    assert metadata["epoch"] == summary["best_epoch"]
    assert metadata["files"]["model.safetensors"]["size"] == len(blob)
    assert summary["status"] == "completed" and summary["test_metrics"] is not None


def test_training_on_s3_storage(s3_server, tmp_path, ray_local, monkeypatch):
    port = s3_server["port"]
    uri = f"s3://{BUCKET}/experiments?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    wandb_dirs = {var: tmp_path / var.lower() for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR")}
    for var, path in wandb_dirs.items():
        monkeypatch.setenv(var, str(path))
    # The tool sets these for W&B from the storage URI: unset before, and again after.
    for var in ("AWS_S3_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)  # where a local default path would be
    cfg = RunConfig.model_validate(apply_overrides(read_yaml(REPO / "configs/digits.yaml"), [
        f"storage_path={uri}", "train.epochs=3", "name=on-s3",
        # The model logged to W&B as a reference to the bucket's object, not a copy.
        "wandb.mode=offline", "wandb.model_files=reference"]))
    run_training(cfg)
    assert not (tmp_path / "runs").exists()  # nothing went to a local default path

    client = s3_server["client"]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]}
    summary = json.loads(client.get_object(Bucket=BUCKET, Key="experiments/on-s3/summary.json")
                         ["Body"].read())
    assert summary["epochs_completed"] == 3
    assert summary["best_checkpoint"].startswith(f"s3://{BUCKET}/experiments/on-s3/checkpoint_")
    best_key = summary["best_checkpoint"].split("?")[0].removeprefix(f"s3://{BUCKET}/")
    assert f"{best_key}/model.safetensors" in keys and f"{best_key}/metadata.json" in keys
    assert "experiments/on-s3/history.json" in keys
    # The segments the recorder wrote were compacted into it when the run ended.
    assert not [k for k in keys if k.startswith("experiments/on-s3/history/")
                and k.endswith(".json")], keys

    # The weights, fetched through the S3 API, reproduce the recorded validation metrics.
    blob = client.get_object(Bucket=BUCKET, Key=f"{best_key}/model.safetensors")["Body"].read()
    workload = build_digits(hidden=64)
    workload.model.load_state_dict(load(blob))
    cfg = RunConfig.model_validate(summary["config"])
    recomputed = evaluate_dataset(workload.model, workload.val_dataset, workload.loss_fn,
                                  workload_metrics(workload, 10), split="val",
                                  batch_size=cfg.train.batch_size, device=torch.device("cpu"))
    for key, value in recomputed.items():
        assert_close(value, summary["best_metrics"][key])
    metadata = json.load(io.BytesIO(client.get_object(
        Bucket=BUCKET, Key=f"{best_key}/metadata.json")["Body"].read()))
    assert metadata["epoch"] == summary["best_epoch"]

    # W&B: one version (the best, which is the last), whose files are references to the
    # bucket's objects with their ETags as digests, and whose metadata is metadata.json's:
    # the epoch's metrics and the model file's size and sha256.
    from tests.integration.test_wandb import artifacts

    logged = artifacts(summary["wandb"]["run"])
    assert [a["metadata"]["epoch"] for a in logged] == [summary["best_epoch"]]
    assert logged[0]["metadata"]["files"] == metadata["files"]
    assert logged[0]["metadata"]["val_loss"] == summary["best_metrics"]["val_loss"]
    entries = {c["path"]: c for c in logged[0]["manifest"]["contents"]}
    for name in ("model.safetensors", "metadata.json"):
        head = client.head_object(Bucket=BUCKET, Key=f"{best_key}/{name}")
        assert entries[name]["ref"] == f"s3://{BUCKET}/{best_key}/{name}"
        assert entries[name]["digest"] == head["ETag"].strip('"')
    # No model bytes staged or cached locally for W&B.
    local = [p for root in (*wandb_dirs.values(), tmp_path / "wandb-runs")
             for p in root.rglob("*") if p.is_file()]
    assert local and not any(p.read_bytes() == blob for p in local)


def test_retried_uploads_keep_each_epochs_own_weights(s3_server, tmp_path, ray_local):
    """The first write of epochs 1 and 2 fails as a network error to the object store does;
    Ray Train retries it while training goes on and snapshots the next epoch. Each kept
    checkpoint must still hold its own epoch's weights (recorded in training, by torch.save)."""
    port = s3_server["port"]
    uri = f"s3://{BUCKET}/retry?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    record_dir = tmp_path / "record"
    record_dir.mkdir()
    config = {
        "name": "retried", "storage_path": uri, "seed": 0,
        "workload": {"entrypoint": "tests.workloads.recorded:build",
                     "params": {"record_dir": str(record_dir), "max_delay_s": 5.0, "last_epoch": 4,
                                "fail_first_write_of": [1, 2]}},
        "scaling": {"num_workers": 2}, "train": {"epochs": 4, "batch_size": 8, "lr": 0.01},
        "checkpoint": {"policy": "all"}, "wandb": {"mode": "disabled"},
    }
    run_training(RunConfig.model_validate(config))

    writes = [json.loads(line) for line in (record_dir / "writes.jsonl").read_text().splitlines()]
    failed = [w for w in writes if w["failed"]]
    assert [w["epoch"] for w in failed] == [1, 2], writes
    for w in failed:  # each retry came after training had recorded the next epoch
        retry = next(x for x in writes if x["epoch"] == w["epoch"] and x["attempt"] == 2)
        assert retry["epochs_recorded"] > w["epoch"], (w, retry)

    client = s3_server["client"]
    summary = json.loads(client.get_object(Bucket=BUCKET, Key="retry/retried/summary.json")
                         ["Body"].read())
    kept = sorted(c["path"] for c in summary["checkpoints"])
    assert len(kept) == 4
    for path in kept:
        key = path.split("?")[0].removeprefix(f"s3://{BUCKET}/")
        metadata = json.loads(client.get_object(Bucket=BUCKET, Key=f"{key}/metadata.json")
                              ["Body"].read())
        blob = client.get_object(Bucket=BUCKET, Key=f"{key}/model.safetensors")["Body"].read()
        assert metadata["files"]["model.safetensors"]["size"] == len(blob)
        saved = load(blob)
        truth = torch.load(record_dir / f"epoch{metadata['epoch']:04d}-rank0.pt",
                           weights_only=True)
        for name, tensor in truth.items():
            assert torch.equal(saved[name], tensor), (metadata["epoch"], name)
    losses = {h["epoch"]: h["val_loss"] for h in summary["history"]}
    assert summary["best_epoch"] == min(losses, key=losses.get)
