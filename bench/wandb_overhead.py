"""What W&B adds to a 10-epoch run: median of 3, offline vs disabled, alternating, one Ray.

    .venv/bin/python -m bench.wandb_overhead [--epochs 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from workers.contract.config import RunConfig


def config(root: Path, name: str, mode: str, epochs: int) -> RunConfig:
    return RunConfig.model_validate({
        "name": name, "storage_path": str(root / "runs"),
        "workload": {"entrypoint": "workers.workloads.digits:build", "params": {"hidden": 64}},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.01},
        "wandb": {"mode": mode},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from orchestrator.start.cluster import init_ray
    from orchestrator.start.console import Console as RunConsole
    from orchestrator.training.driver import run_training

    root = Path(tempfile.mkdtemp(prefix="wandb-overhead-"))
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        os.environ[var] = str(root / var.lower())
        Path(os.environ[var]).mkdir()
    init_ray()
    quiet = RunConsole(stream=open(os.devnull, "w"))  # for the whole run
    run_training(config(root, "warm-up", "disabled", 2), console=quiet)  # worker start-up, imports
    times: dict[str, list[float]] = {"disabled": [], "offline": []}
    for i in range(args.repeats):
        order = ("disabled", "offline") if i % 2 == 0 else ("offline", "disabled")
        for mode in order:
            started = time.perf_counter()
            run_training(config(root, f"{mode}-{i}", mode, args.epochs), console=quiet)
            times[mode].append(time.perf_counter() - started)

    table = Table(title=f"W&B cost, {args.epochs}-epoch digits run, 2 workers, "
                        f"median of {args.repeats}")
    for column in ("wandb.mode", "median s", "runs (s)", "vs disabled"):
        table.add_column(column)
    base = statistics.median(times["disabled"])
    for mode, values in times.items():
        median = statistics.median(values)
        table.add_row(mode, f"{median:.2f}", ", ".join(f"{v:.2f}" for v in values),
                      f"{median / base:.2f}x (+{median - base:.2f} s)")
    Console().print(table)


if __name__ == "__main__":
    main()
