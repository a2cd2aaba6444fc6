"""A node lost from a real two-node cluster (two ``ray start`` nodes on this machine, the
second one's raylet SIGKILLed by its pid): the fixed-size run says it waits, once a minute,
then stops after ``failure.worker_wait_s`` with one line and its record written; an elastic
run continues on the node that is left and ends with the same best as an undisturbed run."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import (
    REPO,
    RunProcesses,
    free_port,
    overfit_config,
    recorded,
    stop_group,
)

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
              "runtime-env-agent-port", "object-manager-port")


def start_node(env: dict, log: Path, *args: str) -> subprocess.Popen:
    """``ray start --block`` with ports of its own (none of Ray's fixed defaults), its
    output in ``log`` for the failure message should it not come up."""
    own = [f"--{flag}={free_port()}" for flag in PORT_FLAGS]
    if "--head" in args:  # the address is the head's own, for the others
        env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    with log.open("w") as out:
        return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--num-cpus=1",
                                 "--disable-usage-stats", *own, *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def alive_node_ports(env: dict) -> set[int]:
    """The node manager ports of the cluster's live nodes; none while the cluster does not
    answer (a loaded machine may take its time)."""
    code = ("import ray, logging; ray.init(logging_level=logging.ERROR); "
            "print(*[n['NodeManagerPort'] for n in ray.nodes() if n['Alive']])")
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return set()
    return {int(p) for p in proc.stdout.split()} if proc.returncode == 0 else set()


def wait_for_node(env: dict, node: subprocess.Popen, log: Path, node_port: int) -> bool:
    """True once the node is alive in the cluster; False if its ``ray start`` exited (a
    port taken between ``free_port`` and the bind). Fails after 5 minutes."""
    deadline = time.monotonic() + 300
    while node_port not in alive_node_ports(env):
        if node.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"the node did not come up:\n{log.read_text()[-3000:]}"
        time.sleep(1)
    return True


def start_alive_node(env: dict, log: Path, args: Callable[[int], list[str]]
                     ) -> tuple[subprocess.Popen, int]:
    """A node alive in the cluster and its node manager port, started with ``args(port)``:
    again on fresh ports when its ``ray start`` exits before it comes up."""
    for _ in range(3):
        node_port = free_port()
        node = start_node(env, log, f"--node-manager-port={node_port}", *args(node_port))
        try:
            if wait_for_node(env, node, log, node_port):
                return node, node_port
        except BaseException:
            stop_group(node)
            raise
    pytest.fail(f"ray start exited three times:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """One head node (1 CPU) for the module; each test adds the second node it loses."""
    home = tmp_path_factory.mktemp("home")  # Ray looks for ~/.ray/auth_token: not the real ~
    # The nodes' workers import the project and its test workloads from the repository.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO),
           # The GCS checks each node every second and calls it dead after 3 failed checks
           # (Ray's default: every 3 s, 5 failures): a killed raylet refuses at once, so the
           # loss is known in about 3 s instead of 15. A live node's check still has 10 s.
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    temp_dir = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")  # short: socket paths

    def head_args(_node_port: int) -> list[str]:
        env["RAY_ADDRESS"] = f"127.0.0.1:{free_port()}"  # the GCS port, fresh on each try
        return ["--head", "--node-ip-address=127.0.0.1",
                f"--port={env['RAY_ADDRESS'].rsplit(':', 1)[1]}", f"--temp-dir={temp_dir}",
                "--include-dashboard=false", f"--ray-client-server-port={free_port()}"]

    head, _ = start_alive_node(env, home / "head.log", head_args)
    cluster = {"env": env, "address": env["RAY_ADDRESS"], "nodes": [head], "logs": home}
    try:
        yield cluster
    finally:
        for proc in reversed(cluster["nodes"]):
            stop_group(proc)


@pytest.fixture
def two_nodes(head_node):
    env = head_node["env"]
    node, node_port = start_alive_node(env, head_node["logs"] / "node.log",
                                       lambda _: [f"--address={head_node['address']}"])
    head_node["nodes"].append(node)
    return {"env": env, "node_manager_port": node_port, "node": node}


def kill_second_node(two_nodes: dict) -> None:
    """SIGKILL the raylet that the second node's ``ray start`` started (its child), not one
    found by name on the machine."""
    raylet = RunProcesses(roots=[two_nodes["node"].pid]).one(
        rf"/raylet/raylet .*--node_manager_port={two_nodes['node_manager_port']}\b")
    os.kill(raylet, signal.SIGKILL)  # the second node is gone, and nothing replaces it


def wait_for_epochs(proc: subprocess.Popen, run_dir: Path, n: int) -> None:
    deadline = time.monotonic() + 240
    while len(recorded(run_dir)) < n:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.5)


def test_an_elastic_run_continues_on_the_node_left_with_the_same_best(two_nodes, tmp_path):
    common = {"train": {"epochs": 20}, "checkpoint": {"resume_every_n_epochs": 1},
              "failure": {"max_failures": 2}}
    env = {**two_nodes["env"], "PYTHONPATH": str(REPO), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"}
    summaries = {}
    # The undisturbed run stops at epoch 8: from the best (epoch 4) on it only overfits.
    for name, workers, epochs in (("undisturbed", 2, 8), ("elastic", [1, 2], 20)):
        cfg = overfit_config(tmp_path, name=name, test_split=True, scaling={"num_workers": workers,
                                                           "use_gpu": False},
                             **{**common, "train": {"epochs": epochs}})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "train", f"{name}.yaml"],
                                cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        run_dir = tmp_path / "runs" / name
        if name == "elastic":
            # Past the best epoch: what follows on one worker overfits further. Ray notices
            # the lost node some seconds later; the run must still be going then.
            wait_for_epochs(proc, run_dir, 6)
            kill_second_node(two_nodes)
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-6000:] + out[-3000:]
        assert "Traceback" not in out + err, (out + err)[-3000:]
        summaries[name] = json.loads((run_dir / "summary.json").read_text())

    elastic, undisturbed = summaries["elastic"], summaries["undisturbed"]
    assert "1-2 workers (elastic)" in out
    assert "trained on 1 worker (was 2)" in out, out[-3000:]
    assert {h["workers"] for h in elastic["history"][:6]} == {2}
    assert elastic["history"][-1]["workers"] == 1
    assert [h["epoch"] for h in elastic["history"]] == list(range(1, 21))
    assert elastic["best_epoch"] == undisturbed["best_epoch"] < 6
    metrics = [k for k in undisturbed["best_metrics"] if k.startswith(("train_", "val_"))]
    for key in metrics:
        assert elastic["best_metrics"][key] == undisturbed["best_metrics"][key], key
    assert elastic["test_metrics"] == pytest.approx(undisturbed["test_metrics"], rel=1e-6)
    assert (Path(elastic["best_checkpoint"]) / "model.safetensors").is_file()


def test_a_lost_node_stops_a_fixed_size_run_after_worker_wait_s(two_nodes, tmp_path):
    cfg = overfit_config(tmp_path, name="node-lost", train={"epochs": 60},
                         scaling={"num_workers": 2, "use_gpu": False},
                         failure={"max_failures": 3, "worker_wait_s": 20},
                         checkpoint={"resume_every_n_epochs": 2})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**two_nodes["env"], "PYTHONPATH": str(REPO), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "train", "run.yaml"],
                            cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    run_dir = tmp_path / "runs" / "node-lost"
    wait_for_epochs(proc, run_dir, 3)
    kill_second_node(two_nodes)
    lost_at = time.monotonic()
    out, err = proc.communicate(timeout=300)
    waited = time.monotonic() - lost_at

    assert proc.returncode == 1, err[-6000:] + out[-3000:]
    assert "Traceback" not in out + err, (out + err)[-3000:]
    assert any(line.startswith("waiting since") for line in out.splitlines()), out[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the cluster had no room for the run's workers"), last
    assert last.endswith("continue with: orchestrator train run.yaml --resume"), last
    assert waited < 20 + 120, waited  # the limit, plus Ray noticing the node is gone
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["epochs_completed"] >= 3
    assert (Path(summary["best_checkpoint"]) / "model.safetensors").is_file()
