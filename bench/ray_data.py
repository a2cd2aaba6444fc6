"""A Ray Dataset streamed to the workers against the same rows held in memory by each worker
(a map-style ``TensorDataset``), side by side in one run on one Ray: epoch time (ratio) and
peak memory per Ray Train worker, for a data set several times larger than Ray's object store
(the cap within which Ray Data streams).

    .venv/bin/python -m bench.ray_data [--rows 262144] [--features 1024] [--epochs 3]
                                       [--store-mb 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def memory_kb(pid: int) -> tuple[int, int]:
    """(resident, private) kB of a process: VmRSS, and Private_Clean + Private_Dirty."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
               .splitlines() if line.startswith("VmRSS:"))
    private = sum(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup")
                  .read_text().splitlines() if line.startswith("Private_"))
    return rss, private


class PeakMemory:
    """Each Ray Train worker's peak resident (RSS) and private (USS) memory, sampled every
    0.25 s among this process's descendants (its own Ray's workers, never another run's)."""

    def __init__(self) -> None:
        self.rss: dict[int, int] = {}
        self.uss: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            for pid in descendants(os.getpid()):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if not cmdline.startswith(b"ray::RayTrainWorker"):
                        continue
                    rss, uss = memory_kb(pid)
                except (OSError, StopIteration):
                    continue  # gone meanwhile
                self.rss[pid] = max(self.rss.get(pid, 0), rss * 1024)
                self.uss[pid] = max(self.uss.get(pid, 0), uss * 1024)


def config(root: Path, mode: str, epochs: int, features: int) -> dict:
    return {
        "name": mode, "storage_path": str(root / "runs"), "seed": 0,
        "workload": {"entrypoint": "bench.streaming:build",
                     "params": {"train_dir": str(root / "train"), "val_dir": str(root / "val"),
                                "mode": mode, "features": features}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "train": {"epochs": epochs, "batch_size": 256, "lr": 0.001},
        "checkpoint": {"policy": "none"}, "wandb": {"mode": "disabled"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=262144)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--store-mb", type=int, default=256)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                             os.environ.get("PYTHONPATH")]))
    import ray

    from bench.streaming import write
    from orchestrator import train
    from orchestrator.start.console import Console as RunConsole

    root = Path(tempfile.mkdtemp(prefix="ray-data-bench-"))
    write(str(root / "train"), args.rows, args.features)
    write(str(root / "val"), args.rows // 16, args.features, seed=1)
    size_mb = sum(p.stat().st_size for p in (root / "train").iterdir()) / 2**20
    # The object store caps what Ray Data holds at once; the workers get half a CPU each,
    # leaving Ray Data one for its read tasks.
    ray.init(address="local", object_store_memory=args.store_mb * 2**20,
             include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    quiet = RunConsole(stream=open(os.devnull, "w"))
    rows = []
    for mode in ("map", "stream"):
        with PeakMemory() as peak:
            summary = train(config(root, mode, args.epochs, args.features), console=quiet)
        steady = [h["epoch_seconds"] for h in summary.history[1:]]
        rows.append({"mode": mode, "epoch_s": statistics.median(steady), "epochs_s": steady,
                     "val_accuracy": summary.history[-1]["val_accuracy"],
                     "peak_rss_mb": max(peak.rss.values()) / 2**20,
                     "peak_uss_mb": max(peak.uss.values()) / 2**20})
    ray.shutdown()

    base = rows[0]["epoch_s"]
    table = Table(title=f"{args.rows:,} training rows x {args.features} float32 "
                        f"({size_mb:,.0f} MB of Parquet), 2 workers, object store "
                        f"{args.store_mb} MB; epochs after the first")
    for column in ("training split", "epoch s median", "vs in memory", "val accuracy",
                   "peak RSS / worker MB", "peak USS / worker MB"):
        table.add_column(column)
    names = {"map": "in memory (TensorDataset per worker)", "stream": "Ray Dataset, streamed"}
    for row in rows:
        table.add_row(names[row["mode"]], f"{row['epoch_s']:.2f}",
                      f"{row['epoch_s'] / base:.2f}x", f"{row['val_accuracy']:.4f}",
                      f"{row['peak_rss_mb']:,.0f}", f"{row['peak_uss_mb']:,.0f}")
    console = Console(record=True, width=120)
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray_data.txt").write_text(console.export_text())
    (RESULTS / "ray_data.json").write_text(json.dumps(
        {"rows": args.rows, "features": args.features, "parquet_mb": size_mb,
         "object_store_mb": args.store_mb, "epochs": args.epochs, "results": rows,
         "when": time.strftime("%Y-%m-%d %H:%M")}, indent=1))


if __name__ == "__main__":
    main()
