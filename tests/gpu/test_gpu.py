"""One NVIDIA GPU, through the project's own API (``run_training``) and a real local Ray, one
worker: ``use_gpu: auto`` chose the GPU, the process group is NCCL, the model and its batches
are on the device, ``bf16`` trains under autocast, the best model saved on the GPU re-scores on
the CPU in a plain process, and a worker SIGKILLed mid-epoch is replaced and the run ends with
the best epoch of an undisturbed one. ``make test-gpu``: 84 s on the CPU
(``ORCHESTRATOR_TEST_DEVICE=cpu``, 2 busy cores); it is meant to stay within 8 minutes.

What the model really did is noted by the test workload itself (``tests.workloads.on_device``).
``ORCHESTRATOR_TEST_DEVICE=cpu`` runs the same checks on the CPU (gloo), where there is no GPU.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

DEVICE = os.environ.get("ORCHESTRATOR_TEST_DEVICE", "cuda")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("needs one NVIDIA GPU: torch.cuda.is_available() is False here "
                "(ORCHESTRATOR_TEST_DEVICE=cpu runs these checks on the CPU)",
                allow_module_level=True)

from orchestrator.start.console import Console  # noqa: E402 - only where the module runs
from orchestrator.training.driver import run_training  # noqa: E402
from tests.integration.conftest import (  # noqa: E402
    RunProcesses,
    assert_close,
    overfit_config,
    ray_local,  # noqa: F401 - the module's Ray
)
from tests.workloads.on_device import notes  # noqa: E402
from workers.checkpoint.load import load_metadata, load_weights  # noqa: E402
from workers.loop.scoring import evaluate_split  # noqa: E402

pytestmark = pytest.mark.gpu

BACKEND = {"cuda": "nccl", "cpu": "gloo"}[DEVICE]
EPOCHS = 8
STEPS_PER_EPOCH = 4  # 32 training samples, batch 8, one worker


def device_config(tmp_path: Path, name: str, params: dict | None = None,
                  train: dict | None = None, **sections):
    out_dir = tmp_path / f"{name}-notes"
    out_dir.mkdir()
    return overfit_config(
        tmp_path, name=name, scaling={"num_workers": 1, "use_gpu": "auto"},
        train={"epochs": EPOCHS, "batch_size": 8, "lr": 0.002, **(train or {})},
        checkpoint={"resume_every_n_epochs": 1},
        workload={"entrypoint": "tests.workloads.on_device:build",
                  "params": {"out_dir": str(out_dir), **(params or {})}},
        **sections), out_dir


def train(cfg) -> tuple[dict, str]:
    out = io.StringIO()
    return run_training(cfg, console=Console(stream=out)), out.getvalue()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_local):  # noqa: F811
    """An undisturbed float32 run."""
    cfg, out_dir = device_config(tmp_path_factory.mktemp("reference"), "reference")
    summary, printed = train(cfg)
    return cfg, summary, printed, out_dir


def on_device(where: str) -> bool:
    return where.split(":")[0] == DEVICE


def test_auto_chose_the_device_and_the_model_and_batches_ran_there(reference):
    cfg, summary, printed, out_dir = reference
    assert f" on {'GPU (NCCL)' if DEVICE == 'cuda' else 'CPU (gloo)'}, " in printed, printed
    trained = notes(out_dir, "train")
    assert len(trained) == 1, trained  # one worker process, never restarted
    seen = trained[0]
    assert on_device(seen["param_device"]) and on_device(seen["batch_device"]), seen
    assert seen["backend"] == BACKEND and seen["rank"] == 0, seen
    assert seen["autocast"] is False  # train.precision: fp32
    # Validation ran there too, in the same worker.
    evaluated = [n for n in notes(out_dir, "eval") if n["pid"] == seen["pid"]]
    assert evaluated and all(on_device(n["batch_device"]) and on_device(n["param_device"])
                             for n in evaluated), evaluated
    assert [h["epoch"] for h in summary["history"]] == list(range(1, EPOCHS + 1))


def test_the_best_model_saved_there_rescores_on_the_cpu_in_a_plain_process(reference):
    cfg, summary, _, _ = reference
    best_dir = Path(summary["best_checkpoint"])
    assert load_metadata(best_dir)["epoch"] == summary["best_epoch"]
    weights = load_weights(best_dir)
    assert {t.device.type for t in weights.values()} == {"cpu"}
    assert {t.dtype for t in weights.values()} == {torch.float32}
    recomputed = evaluate_split(cfg, best_dir, "val", device="cpu")
    assert set(recomputed) <= set(summary["best_metrics"])
    for key, value in recomputed.items():
        assert_close(value, summary["best_metrics"][key], rel=1e-5)


def test_bf16_trains_under_autocast_and_saves_float32_weights(tmp_path, ray_local):  # noqa: F811
    cfg, out_dir = device_config(tmp_path, "bf16", train={"epochs": 3, "precision": "bf16"})
    summary, _ = train(cfg)
    (seen,) = notes(out_dir, "train")
    assert on_device(seen["batch_device"]), seen
    assert seen["autocast"] is True and seen["autocast_dtype"] == "torch.bfloat16", seen
    losses = [h["val_loss"] for h in summary["history"]]
    assert len(losses) == 3 and summary["best_metrics"]["val_loss"] == min(losses)
    weights = load_weights(summary["best_checkpoint"])
    assert {t.dtype for t in weights.values()} == {torch.float32}


def kill_when_held(marker: Path, killed: list, timeout: float = 300) -> threading.Thread:
    """SIGKILL the worker that wrote its pid into ``marker`` (checked to be a Ray Train worker
    of this test's own Ray: a descendant of this process), from a thread: ``run_training``
    blocks the test."""
    def kill() -> None:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
        pid = int(marker.read_text())
        workers = RunProcesses(roots=[os.getpid()]).find(r"^ray::RayTrainWorker")
        if pid in workers:  # else nothing is killed, and the held worker fails loudly
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        else:
            killed.append(f"{pid} is not a Ray Train worker of this run: {workers}")

    thread = threading.Thread(target=kill, name="kill-held-worker", daemon=True)
    thread.start()
    return thread


def test_a_killed_worker_is_replaced_and_the_run_ends_with_the_same_best(tmp_path, reference):
    _, undisturbed, _, _ = reference
    marker = tmp_path / "held"
    # Mid epoch 6, after the best (epoch 4 here, on CPU and GPU alike): the restarted run must
    # remember it (the tracker's state in the checkpoint), or epoch 6 would become "best".
    assert undisturbed["best_epoch"] < 6, [h["val_loss"] for h in undisturbed["history"]]
    hold_at = 5 * STEPS_PER_EPOCH + 2
    cfg, out_dir = device_config(tmp_path, "killed",
                                 {"hold_at_step": hold_at, "marker": str(marker)},
                                 failure={"max_failures": 1})
    killed: list = []
    thread = kill_when_held(marker, killed)
    summary, printed = train(cfg)
    thread.join(timeout=10)

    assert len(killed) == 1 and isinstance(killed[0], int), killed
    pids = [n["pid"] for n in notes(out_dir, "train")]
    assert pids[0] == killed[0] and len(pids) == 2, pids  # a new worker after the restart
    assert all(on_device(n["param_device"]) for n in notes(out_dir, "train"))
    history = summary["history"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    losses = [h["val_loss"] for h in history]
    assert summary["best_epoch"] == losses.index(min(losses)) + 1
    assert summary["best_epoch"] == undisturbed["best_epoch"], (losses, [
        h["val_loss"] for h in undisturbed["history"]])
    assert [h["is_best"] for h in history] == [h["is_best"] for h in undisturbed["history"]]
    # Restored from the latest checkpoint (weights, optimizer, tracker): the same numbers (on
    # a GPU up to the order in which its kernels add, hence the looser bound there).
    for got, ref in zip(history, undisturbed["history"], strict=True):
        assert_close(got["val_loss"], ref["val_loss"], rel=1e-5 if DEVICE == "cpu" else 1e-3)
    assert load_metadata(summary["best_checkpoint"])["epoch"] == summary["best_epoch"]
