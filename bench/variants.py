"""Running one variant once: its config, its trainer, and the raw measurements.

A run returns a plain dict (``RunRecord``): the wall-clock stamps of its epochs, rank 0's
blocked time per save and host-copy time, bytes written, peak storage held, peak host
memory and CPU times. ``bench.stats`` turns records into the table.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.probes import ControllerClock, Sampler, WorkerProbe, read_jsonl
from bench.workload import MONITOR
from workers.compat import TRAIN_HEALTH_CHECK_INTERVAL_ENV
from workers.contract.config import RunConfig

HEALTH_CHECK_ENV = TRAIN_HEALTH_CHECK_INTERVAL_ENV

# name -> what runs. "project" variants are the project's own loop and trainer with a
# checkpoint policy; the others are baselines (see bench.native and bench.loops).
VARIANTS: dict[str, dict[str, Any]] = {
    "native": {"kind": "native"},
    "bare": {"kind": "project", "checkpoint": {"policy": "none"}},
    "naive": {"kind": "baseline", "loop": "bench.loops:naive_loop"},
    "ray-default": {"kind": "baseline", "loop": "bench.loops:ray_default_loop"},
    "best": {"kind": "project", "checkpoint": {"policy": "best"}},
    "every_n": {"kind": "project", "checkpoint": {"policy": "every_n", "every_n_epochs": 2}},
    "last": {"kind": "project", "checkpoint": {"policy": "last"}},
    # The same loop with the model sharded (scaling.strategy: fsdp).
    "bare-fsdp": {"kind": "project", "checkpoint": {"policy": "none"}, "strategy": "fsdp"},
    "best-fsdp": {"kind": "project", "checkpoint": {"policy": "best"}, "strategy": "fsdp"},
}
BATCH_SIZE = {"small": 64, "large": 64}


def make_config(variant: str, size: str, *, epochs: int, workers: int, storage: Path,
                name: str) -> RunConfig:
    spec = VARIANTS[variant]
    return RunConfig.model_validate({
        "name": name,
        "storage_path": str(storage),
        "seed": 0,
        "workload": {"entrypoint": "bench.workload:build", "params": {"size": size}},
        "scaling": {"num_workers": workers, "use_gpu": False,
                    "strategy": spec.get("strategy", "ddp")},
        "train": {"epochs": epochs, "batch_size": BATCH_SIZE[size], "lr": 1e-3},
        "tracker": {"monitor": MONITOR, "mode": "min"},
        "checkpoint": spec.get("checkpoint", {"policy": "none"}),
        "wandb": {"mode": "disabled"},
    })


def _import(path: str) -> Any:
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _baseline_trainer(variant: str, cfg: RunConfig, callbacks: list[Any]) -> Any:
    from ray.train import CheckpointConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    keep = (CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=MONITOR,
                             checkpoint_score_order="min")
            if variant == "ray-default" else CheckpointConfig())
    return TorchTrainer(
        _import(VARIANTS[variant]["loop"]),
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=False),
        run_config=RayRunConfig(name=cfg.name, storage_path=cfg.storage_path,
                                checkpoint_config=keep, callbacks=callbacks,
                                logging_config=LoggingConfig(log_level="WARNING")),
    )


def run_ray_variant(variant: str, cfg: RunConfig, log_dir: Path,
                    interval_s: str) -> dict[str, Any]:
    from orchestrator.training.ray_trainer import build_trainer

    log_dir.mkdir(parents=True)
    run_dir = Path(cfg.storage_path) / cfg.name
    # The controller reads the poll interval from its environment; Ray Train copies this
    # variable from the process that calls fit() into the controller's runtime_env.
    os.environ[HEALTH_CHECK_ENV] = interval_s
    callbacks = [ControllerClock(str(log_dir)), WorkerProbe(str(log_dir))]
    if VARIANTS[variant]["kind"] == "project":
        trainer = build_trainer(cfg, str(run_dir), False, callbacks=callbacks)
    else:
        trainer = _baseline_trainer(variant, cfg, callbacks)

    known: list[int] = []

    def pids() -> list[int]:
        if len(known) < cfg.scaling.num_workers:
            known[:] = [r["pid"] for r in read_jsonl(log_dir / "workers.jsonl")]
        return known

    started = time.time()
    with Sampler(run_dir, pids) as sampler:
        trainer.fit()
    ended = time.time()
    clock = read_jsonl(log_dir / "controller.jsonl")
    return {
        "stamps": [r["t"] for r in clock],
        "started": started, "ended": ended,
        "rank0": [r["rank0"] for r in clock],
        "report_s": [r["report_s"] for r in read_jsonl(log_dir / "reports.jsonl")],
        "saved": [r["checkpoint"] is not None or "written_bytes" in r for r in clock],
        "written_bytes": sum(r.get("written_bytes", 0) for r in clock),
        "written_weight_bytes": sum(r.get("written_weight_bytes", 0) for r in clock),
        "peak_files": sampler.peak_files, "peak_bytes": sampler.peak_bytes,
        "peak_rss_bytes": sampler.peak_rss_bytes,
        "worker_cpu_s": sum(sampler.cpu_s.values()),
        "controller_cpu_s": [r["cpu_s"] for r in clock],
        "interval_env": clock[0]["interval_env"] if clock else None,
        "niceness": sorted({r["niceness"] for r in read_jsonl(log_dir / "workers.jsonl")}),
    }


def run_native_variant(cfg: RunConfig, log_dir: Path) -> dict[str, Any]:
    from bench.native import run_native

    log_dir.mkdir(parents=True)
    known: list[int] = []
    started = time.time()
    with Sampler(log_dir / "no-storage", lambda: known) as sampler:
        out = run_native(cfg.to_dict(), log_dir / "native.json", cfg.scaling.num_workers,
                         on_start=known.extend)
    ended = time.time()
    return {
        "stamps": out["stamps"][1:],  # [0] is the start of epoch 1
        "started": started, "ended": ended,
        "rank0": [{} for _ in out["history"]], "report_s": [],
        "saved": [False for _ in out["history"]],
        "written_bytes": 0, "written_weight_bytes": 0, "peak_files": 0, "peak_bytes": 0,
        "peak_rss_bytes": sampler.peak_rss_bytes,
        "worker_cpu_s": sum(sampler.cpu_s.values()),
        "controller_cpu_s": [], "interval_env": None, "niceness": [out["niceness"]],
    }


def run_variant(variant: str, size: str, *, epochs: int, workers: int, root: Path,
                tag: str, interval_s: str) -> dict[str, Any]:
    """One run of ``variant``; its storage is deleted afterwards (measured while it ran)."""
    name = f"{variant}-{size}-{tag}"
    storage = root / "storage"
    cfg = make_config(variant, size, epochs=epochs, workers=workers, storage=storage,
                      name=name)
    log_dir = root / "logs" / name
    if VARIANTS[variant]["kind"] == "native":
        try:
            record = run_native_variant(cfg, log_dir)
        except Exception as exc:  # noqa: BLE001 - e.g. its free port taken meanwhile: once more
            print(f"native run failed ({type(exc).__name__}: {exc}); running it again",
                  file=sys.stderr)
            shutil.rmtree(log_dir)
            record = {**run_native_variant(cfg, log_dir), "retried_after": str(exc)}
    else:
        record = run_ray_variant(variant, cfg, log_dir, interval_s)
    shutil.rmtree(storage / name, ignore_errors=True)
    return {"variant": variant, "size": size, "tag": tag, "epochs": epochs,
            "workers": workers, **record}

