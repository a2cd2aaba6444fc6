"""Wall time of a 4-trial search, 2 trials at a time, against the same 4 trials one by one.

    .venv/bin/python -m bench.tune_timing
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from workers.contract.config import RunConfig


def search(root: Path, name: str, concurrent: int) -> RunConfig:
    return RunConfig.model_validate({
        "name": name, "storage_path": str(root / "runs"),
        "workload": {"entrypoint": "tests.workloads.overfit:build"},
        "scaling": {"num_workers": 1},
        "train": {"epochs": 4, "batch_size": 16, "lr": 0.002},
        "wandb": {"mode": "disabled"},
        "tune": {"num_samples": 1, "max_concurrent_trials": concurrent,
                 "search_space": {"workload.params.separation": {"grid": [1.0, 0.7, 0.3, 0.1]}}},
    })


def main() -> None:
    from orchestrator.search.runner import run_search
    from orchestrator.start.cluster import init_ray
    from orchestrator.start.console import Console as RunConsole

    root = Path(tempfile.mkdtemp(prefix="tune-timing-"))
    init_ray()
    quiet = RunConsole(stream=open(os.devnull, "w"))  # for the whole run
    rows = []
    for name, concurrent in (("concurrent-2", 2), ("one-by-one", 1)):
        started = time.perf_counter()
        run_search(search(root, name, concurrent), console=quiet)
        rows.append((name, concurrent, time.perf_counter() - started))
    table = Table(title="4 trials x 4 epochs, 1 worker each, on 2 CPUs")
    for column in ("search", "trials at a time", "wall s", "vs one-by-one"):
        table.add_column(column)
    serial = rows[-1][2]
    for name, concurrent, seconds in rows:
        table.add_row(name, str(concurrent), f"{seconds:.1f}", f"{seconds / serial:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
