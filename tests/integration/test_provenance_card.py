"""Provenance and the model card on a real 2-worker run: summary.json, every checkpoint's
metadata.json, the W&B offline run's config and its best model's artifact carry the same
provenance; model_card.md's numbers are summary.json's; a --resume after the workload's module
was edited says so in one line and records it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from orchestrator.start.console import Console
from orchestrator.training.driver import run_training
from tests.integration.conftest import REPO, checkpoint_dirs, overfit_config
from tests.integration.test_wandb import artifacts, inspect
from tests.integration.test_wandb import wandb_env as wandb_env  # a fixture, re-exported
from tests.unit.test_card import as_number, front_matter, tables

pytestmark = pytest.mark.integration

MODULE = "prov_overfit_copy"  # a copy of tests/workloads/overfit.py, edited between the runs


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    """A folder holding the workload's copy, on the path of this process and (through
    PYTHONPATH, read when the local Ray starts) of every Ray worker."""
    folder = tmp_path_factory.mktemp("code")
    shutil.copy(REPO / "tests" / "workloads" / "overfit.py", folder / f"{MODULE}.py")
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), before]))
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    if before is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = before


def wandb_config(run_dir: str) -> dict:
    """The offline run's config, as its records hold it (key -> value)."""
    config = {}
    for line in inspect(run_dir).splitlines():
        record = json.loads(line)
        for holder in (record.get("run") or {}, record):
            update = (holder.get("config") or {}).get("update") or {}
            if isinstance(update, dict):  # `wandb leet inspect` prints {key: value}
                config.update(update)
            else:  # the protobuf's shape: [{key, value_json}]
                config.update({i["key"]: json.loads(i["value_json"]) for i in update})
    return config


def config_for(root: Path, epochs: int):
    return overfit_config(root, name="prov", train={"epochs": epochs},
                          workload={"entrypoint": f"{MODULE}:build",
                                    "params": {"with_test": True}},
                          wandb={"mode": "offline"})


def test_provenance_everywhere_the_card_and_a_resume_after_an_edit(code_dir, ray_local,
                                                                  wandb_env):
    module = code_dir / f"{MODULE}.py"
    summary = run_training(config_for(wandb_env, 2))

    # summary.json: the code (this module's sha256; this repository's commit), packages, data.
    prov = summary["provenance"]
    assert prov["code"]["module_sha256"] == hashlib.sha256(module.read_bytes()).hexdigest()
    assert prov["code"]["module_file"] == str(module)
    assert prov["code"]["git_commit"] is None  # the copy lives outside any repository
    assert prov["code"]["project_version"]
    assert {"python", "torch", "ray", "wandb"} <= set(prov["packages"])
    assert set(prov["data"]) == {"train", "val", "test"}
    for split in prov["data"].values():
        assert split["kind"] == "map" and split["length"] > 0 and len(split["sha256"]) == 64
    assert summary["provenance_changes"] == []
    on_disk = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert on_disk["provenance"] == prov

    # Every checkpoint's metadata.json.
    kept = checkpoint_dirs(Path(summary["run_dir"]))
    assert kept
    for directory in kept:
        assert json.loads((directory / "metadata.json").read_text())["provenance"] == prov

    # W&B: the run's config and the best model's artifact (with the card among its files).
    run = summary["wandb"]["run"]
    assert wandb_config(run)["provenance"] == prov
    best = [a for a in artifacts(run) if "best" in a["aliases"]][-1]
    assert best["metadata"]["provenance"] == prov
    assert "model_card.md" in {c["path"] for c in best["manifest"]["contents"]}

    # model_card.md: read back, its numbers are the summary's.
    text = (Path(summary["run_dir"]) / "model_card.md").read_text()
    results = front_matter(text)["model-index"][0]["results"]
    assert {m["type"]: m["value"] for m in results[1]["metrics"]} == summary["test_metrics"]
    found = tables(text)
    best_metrics = {r["metric"]: as_number(r["value"])
                    for r in found["Every metric of the best evaluation"]}
    for key, value in summary["best_metrics"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert best_metrics[key] == value, key
    for row, record in zip(found["Curves"], summary["history"], strict=True):
        assert as_number(row["val_loss"]) == record["val_loss"]
        assert as_number(row["train_loss"]) == record["train_loss"]

    # The workload's module edited, then --resume: one line, the change recorded, it goes on.
    module.write_text(module.read_text() + "\n# edited after the first run\n")
    out = io.StringIO()
    resumed = run_training(config_for(wandb_env, 3), resume=True, console=Console(stream=out))
    lines = [line for line in out.getvalue().splitlines() if line.startswith("resume:")]
    assert len(lines) == 1 and "the workload's module changed" in lines[0], out.getvalue()
    new_sha = hashlib.sha256(module.read_bytes()).hexdigest()
    assert resumed["provenance_changes"] == [
        {"epoch": 2, "what": "the workload's module",
         "before": prov["code"]["module_sha256"], "after": new_sha}]
    assert resumed["provenance"]["code"]["module_sha256"] == new_sha
    assert resumed["provenance"]["data"] == prov["data"]  # the same data
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    card = (Path(resumed["run_dir"]) / "model_card.md").read_text()
    assert new_sha in card and "Changed on a resume" in card
