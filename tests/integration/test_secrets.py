"""No secret from the user's environment reaches a file, a log or the terminal: a W&B API key,
a Ray token and AWS secrets set to marker values, then a training run (verbose: Ray's own
output shown too) and a search, each with an offline W&B run; every file they wrote, under
the run directories, the home directory and Ray's session logs, is read byte for byte.
(``ray job submit`` is scanned the same way in test_job_submit.py.)"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from tests.integration.conftest import (
    REPO,
    find_secrets,
    overfit_config,
    run_cli,
    secret_markers,
)

pytestmark = pytest.mark.integration


def test_no_secret_reaches_a_file_a_log_or_the_terminal(tmp_path):
    markers = secret_markers()
    home = tmp_path / "home"  # anything written under ~ is scanned too
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, **markers, "HOME": str(home), "RAY_TMPDIR": str(ray_tmp),
           "AWS_ACCESS_KEY_ID": "testing", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    train = overfit_config(tmp_path, name="train-run", train={"epochs": 3},
                           wandb={"mode": "offline"}).to_dict()
    search = overfit_config(tmp_path, name="search", scaling={"num_workers": 1},
                            train={"epochs": 2}, wandb={"mode": "offline"}).to_dict()
    search["tune"] = {"num_samples": 1, "max_concurrent_trials": 1,
                      "search_space": {"train.lr": {"choice": [0.002]}}}
    (tmp_path / "train.yaml").write_text(json.dumps(train))
    (tmp_path / "tune.yaml").write_text(json.dumps(search))

    printed = {}
    for command in (["train", "train.yaml", "--verbose"], ["tune", "tune.yaml"]):
        proc = run_cli(command, tmp_path, env, timeout=400)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        printed[f"{command[0]} stdout"], printed[f"{command[0]} stderr"] = proc.stdout, proc.stderr

    found, read = find_secrets(markers, [tmp_path, ray_tmp], printed)
    assert found == [], found
    # What was read includes each place a secret could have gone.
    runs = tmp_path / "runs"
    for place in (runs / "train-run" / "wandb", runs / "search" / "trials", runs / "search"
                  / "wandb", ray_tmp / "ray"):
        assert any(p.is_relative_to(place) for p in read), place
    assert any(p.suffix == ".wandb" for p in read)
    assert sum(1 for p in read if p.is_relative_to(ray_tmp) and "logs" in p.parts) > 10
