"""`ray job submit` to a real `ray start --head` with token authentication (Ray 2.60)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, find_secrets, free_port, secret_markers, stop_group

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
# What the README tells users to pass: keep the upload small. (Report pacing needs nothing:
# the driver sets it and Ray Train passes it on to its controller.)
RUNTIME_ENV = {"excludes": [".venv", "runs", "wandb", ".git", "bench/results", "*.egg-info"]}


@pytest.fixture
def ray_head(tmp_path):
    """A head node of our own: its own temp dir and ports, token auth on, stopped after."""
    markers = secret_markers()  # its token, and secrets a user's environment may hold
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: socket paths
    gcs_port, dashboard_port = free_port(), free_port()
    # Every fixed default port of its own too: another Ray on this machine may hold them.
    own_ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port",
        "object-manager-port")]
    home = tmp_path / "home"  # Ray looks for ~/.ray/auth_token: never the real home
    home.mkdir()
    env = {**os.environ, **markers, "RAY_AUTH_MODE": "token", "HOME": str(home),
           # the job's `python` is whichever is first on the head's PATH
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--temp-dir={temp_dir}", "--num-cpus=2", "--disable-usage-stats", *own_ports],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    client_env = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the job server answers once the dashboard is up
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                               env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            break
        assert head.poll() is None, head.stdout.read()
        time.sleep(2)
    else:
        pytest.fail("the Ray head's job server did not come up in 120 s")
    try:
        yield {"address": address, "env": env, "client_env_without_token": client_env,
               "markers": markers, "scanned": [Path(temp_dir), home]}
    finally:
        stop_group(head)


def test_job_submit_with_token_auth(ray_head, tmp_path):
    storage = tmp_path / "shared-storage"  # a path every node can see (one node here)
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", ray_head["address"],
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps(RUNTIME_ENV), "--",
        "python", "-m", "orchestrator", "train", "configs/digits.yaml",
        "--set", f"storage_path={storage}", "--set", "train.epochs=3", "--set", "name=job-run",
        "--set", "wandb.mode=offline",  # a W&B key is set (a marker): offline, by choice
    ]
    refused = subprocess.run(submit, env=ray_head["client_env_without_token"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "token authentication is enabled" in (refused.stdout + refused.stderr).lower()
    assert not storage.exists()

    for _ in range(15):  # the head's job agent registers a little after its job server is up
        job = subprocess.run(submit, env=ray_head["env"], capture_output=True, text=True,
                             timeout=600)
        logs = job.stdout + job.stderr
        if "No available agent to submit job" not in logs:
            break
        time.sleep(2)
    assert job.returncode == 0, logs[-4000:]
    assert "succeeded" in logs.lower()
    assert "epoch 3/3" in logs and "best epoch" in logs  # progress and the final table
    summary = json.loads((storage / "job-run" / "summary.json").read_text())
    assert summary["epochs_completed"] == 3
    assert (Path(summary["best_checkpoint"]) / "model.safetensors").is_file()

    # Nothing the job wrote or printed, nor the head's session logs, holds a secret.
    found, read = find_secrets(ray_head["markers"], [storage, *ray_head["scanned"]],
                               {"job output": logs})
    assert found == [], found
    assert any(p.suffix == ".wandb" for p in read)
    assert any("job-driver" in p.name for p in read), "the job's own log was not read"
