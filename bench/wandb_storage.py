"""What W&B costs on the local disk, and what it would upload, by ``wandb.keep``:

    .venv/bin/python -m bench.wandb_storage [--size large] [--epochs 10]

The benchmark's workload (``bench.workload``: the monitored metric improves in epochs 1, 2,
3, 5 and 8 of 10), checkpoint policy ``best``, an offline W&B run; each variant in its own
``WANDB_DATA_DIR``/``WANDB_CACHE_DIR``. After each run: the bytes W&B staged for upload (what
``wandb sync`` would send), the bytes of its cache and of the offline run directory, the
versions logged, and the driver's time per logged model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

VARIANTS = {
    "before: keep all": {"keep": "all"},
    "keep best_and_last": {"keep": "best_and_last"},
    "log_model end": {"log_model": "end"},
}


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def run_variant(name: str, wandb_cfg: dict[str, Any], size: str, epochs: int,
                root: Path) -> dict[str, Any]:
    from bench.variants import make_config
    from orchestrator.tracking import wandb_run
    from orchestrator.training.driver import run_training
    from workers.contract.config import RunConfig

    dirs = {var: root / name.replace(" ", "_").replace(":", "") / var.lower()
            for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR")}
    for var, path in dirs.items():
        path.mkdir(parents=True)
        os.environ[var] = str(path)
    base = make_config("best", size, epochs=epochs, workers=2, storage=root / "runs",
                       name=name.replace(" ", "-").replace(":", "")).to_dict()
    base["wandb"] = {**base["wandb"], "mode": "offline", **wandb_cfg}
    cfg = RunConfig.model_validate(base)

    timings: list[float] = []
    original = wandb_run.WandbRun.log_model

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            timings.append(time.perf_counter() - started)

    wandb_run.WandbRun.log_model = timed
    try:
        summary = run_training(cfg)
    finally:
        wandb_run.WandbRun.log_model = original
    offline = Path(summary["wandb"]["run"])
    return {
        "staged": tree_bytes(dirs["WANDB_DATA_DIR"]),
        "cache": tree_bytes(dirs["WANDB_CACHE_DIR"]),
        "offline run": tree_bytes(offline),
        "versions": len(summary["wandb"]["logged_epochs"]),
        "log s": statistics.median(timings) if timings else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    from orchestrator.start.cluster import init_ray

    init_ray()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="wandb-storage-") as tmp:
        for name, wandb_cfg in VARIANTS.items():
            rows[name] = run_variant(name, wandb_cfg, args.size, args.epochs, Path(tmp))
    mb = 1e6
    table = Table(title=f"W&B on the local disk: {args.size} model, {args.epochs} epochs, "
                        "5 improvements, policy best, offline")
    for column in ("variant", "versions", "staged for upload MB", "x before", "cache MB",
                   "offline run MB", "driver s per logged model"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    before = rows["before: keep all"]["staged"] or 1
    for name, r in rows.items():
        table.add_row(name, str(r["versions"]), f"{r['staged'] / mb:.1f}",
                      f"{r['staged'] / before:.2f}", f"{r['cache'] / mb:.1f}",
                      f"{r['offline run'] / mb:.2f}", f"{r['log s']:.3f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
