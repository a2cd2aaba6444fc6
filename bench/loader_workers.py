"""An augmented image workload's epoch time with ``train.loader_workers`` 0 and 2, side by
side in one run (alternating order, one Ray): torchvision's ResNet-18 on 32x32 PIL images,
random flips and crops decoded per sample, 2 Ray Train workers.

    .venv/bin/python -m bench.loader_workers [--epochs 3] [--repeats 2] [--images 384]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]


def config(root: Path, name: str, workers: int, epochs: int, images: int) -> dict:
    return {
        "name": name, "storage_path": str(root / "runs"), "seed": 0,
        "workload": {"entrypoint": "tests.workloads.shapes:build",
                     "params": {"n_train": images, "n_val": images // 4, "n_test": 8}},
        "scaling": {"num_workers": 2},
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.003, "loader_workers": workers},
        "checkpoint": {"policy": "none"}, "wandb": {"mode": "disabled"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--images", type=int, default=384)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # the workload lives in tests/workloads
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                             os.environ.get("PYTHONPATH")]))

    from orchestrator import train
    from orchestrator.start.cluster import init_ray
    from orchestrator.start.console import Console as RunConsole

    root = Path(tempfile.mkdtemp(prefix="loader-workers-"))
    init_ray()
    quiet = RunConsole(stream=open(os.devnull, "w"))
    train(config(root, "warm-up", 0, 1, 64), console=quiet)  # worker start-up, imports
    epochs: dict[int, list[float]] = {0: [], 2: []}
    for i in range(args.repeats):
        for workers in ((0, 2) if i % 2 == 0 else (2, 0)):
            summary = train(config(root, f"w{workers}-{i}", workers, args.epochs, args.images),
                            console=quiet)
            # The first epoch also starts the loader processes: the steady state is the rest.
            epochs[workers] += [h["epoch_seconds"] for h in summary.history[1:]]

    table = Table(title=f"augmented ResNet-18 epochs ({args.images} images, 2 workers, "
                        f"{args.repeats} runs of {args.epochs} epochs; the first of each left "
                        "out)")
    for column in ("train.loader_workers", "epoch s median", "epochs (s)", "vs 0"):
        table.add_column(column)
    base = statistics.median(epochs[0])
    for workers, values in epochs.items():
        median = statistics.median(values)
        table.add_row(str(workers), f"{median:.2f}", ", ".join(f"{v:.2f}" for v in values),
                      f"{median / base:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
