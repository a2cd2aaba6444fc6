"""A Ray Dataset streamed to the workers against the same rows held in memory by each worker
(a map-style ``TensorDataset``), side by side in one run on one Ray: epoch time (ratio) and
peak memory per Ray Train worker, for a data set several times larger than Ray's object store
(the cap within which Ray Data streams).

    .venv/bin/python -m bench.ray_data [--rows 262144] [--features 1024] [--epochs 3]
        [--store-mb 256] [--modes map,stream-before,stream,pyarrow] [--profile ROUNDS]

Modes: ``map`` (in memory), ``stream-before`` (the stream as it was before issue 42, its
functions swapped back in by ``bench/streaming.py``), ``stream-ray`` (Ray Data's stream as the
project streams a split that is not plain Parquet, forced by ``workload.ray_data_streaming``),
``stream`` (now: each worker reads its own rows of the plain Parquet split,
``workers/loop/parquet_shards.py``) and ``pyarrow`` (a plain pyarrow loop in a torch
``IterableDataset``). ``--profile`` first times each stage of the Ray Data stream in this
process (read, batching, conversion, shuffle, the split to two readers) against pyarrow's own
read of the same files, and the ranks' own read of the same split (one rank, then two).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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


def timed(fn: Callable[[], int]) -> float:
    start = time.perf_counter()
    rows = fn()
    assert rows > 0
    return time.perf_counter() - start


def count(batches: Any) -> int:
    """Rows in an iterator of batches (Arrow tables, column dicts or (x, y) pairs)."""
    rows = 0
    for batch in batches:
        rows += (batch.num_rows if hasattr(batch, "num_rows") else
                 len(batch[1]) if isinstance(batch, tuple) else len(next(iter(batch.values()))))
    return rows


def floor(path: Path, features: int) -> int:
    """The hand-written read: pyarrow batches of 256 rows to tensors, in this process."""
    import pyarrow.parquet as pq
    import torch

    rows = 0
    for file in sorted(path.glob("*.parquet")):
        for batch in pq.ParquetFile(file).iter_batches(batch_size=256):
            x = torch.from_numpy(batch.column("x").flatten().to_numpy().reshape(-1, features))
            rows += len(torch.from_numpy(batch.column("y").to_numpy())) + 0 * len(x)
    return rows


def split_in_two(ds: Any, **options: Any) -> int:
    """``streaming_split(2, equal=True)``, each half read by its own thread (as the two
    workers read theirs)."""
    halves, rows = ds.streaming_split(2, equal=True), [0, 0]

    def read(index: int) -> None:
        rows[index] = count(halves[index].iter_torch_batches(**options))

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(rows)


def stage_times(path: Path, features: int, before: bool) -> dict[str, float]:
    """Seconds for each stage of the stream, each one adding a step to the one before, on the
    whole split in this process: ``before``, as the project streamed before issue 42."""
    import ray.data

    from workers.loop import ray_data

    def ds() -> Any:
        dataset = ray.data.read_parquet(str(path))
        return dataset if before else ray_data.for_streaming(SimpleNamespace(), dataset)

    collate = ray_data.columns_collate(["x"], "y", "train")
    tensors = ({"device": "cpu"} if before else
               {"device": "cpu", "collate_fn": ray_data.arrow_collate(collate)})
    shuffle = {"local_shuffle_buffer_size": ray_data.SHUFFLE_BUFFER_ROWS,
               "local_shuffle_seed": 1}
    batch = {"batch_size": 256, "prefetch_batches": 2 if before else ray_data.PREFETCH_BATCHES}
    return {
        "read, decode, object store (whole blocks)": timed(lambda: count(
            ds().iter_batches(batch_size=None, batch_format="pyarrow"))),
        "batches of 256 rows": timed(lambda: count(
            ds().iter_batches(batch_format="pyarrow", **batch))),
        "conversion to tensors": timed(lambda: count(
            ds().iter_torch_batches(**tensors, **batch))),
        "local shuffle buffer": timed(lambda: count(
            ds().iter_torch_batches(**tensors, **batch, **shuffle))),
        "streaming_split to 2 readers": timed(lambda: split_in_two(
            ds(), **tensors, **batch, **shuffle)),
    }


def profile(root: Path, features: int, repeat: int) -> dict[str, Any]:
    """The fastest of ``repeat`` rounds for each stage, before and after, alternated (the
    least disturbed by the other work of a shared machine), after one read that starts Ray's
    worker processes."""
    import ray.data

    count(ray.data.read_parquet(str(root / "val")).iter_batches(batch_format="pyarrow"))
    rounds: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    floors = []
    for _ in range(repeat):
        floors.append(timed(lambda: floor(root / "train", features)))
        for name in rounds:
            rounds[name].append(stage_times(root / "train", features, before=name == "before"))
    ranks = [rank_reads(root / "train", world) for world in (1, 2) for _ in range(repeat)]
    return {"floor_s": min(floors),
            "rank_reads_s": {f"{w} rank(s)": min(r[1] for r in ranks if r[0] == w)
                             for w in (1, 2)},
            **{name: {stage: min(r[stage] for r in runs) for stage in runs[0]}
               for name, runs in rounds.items()}}


def rank_reads(path: Path, world: int) -> tuple[int, float]:
    """(world, seconds) for ``world`` ranks (threads here) reading their own rows of the
    split, shuffled, as tensor batches of 256 (``workers/loop/parquet_shards.py``)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from workers.loop import ray_data
    from workers.loop.parquet_shards import ParquetSplit, ParquetTrain

    files = sorted(str(p) for p in path.glob("*.parquet"))
    footers = [pq.read_metadata(f) for f in files]
    schema = footers[0].schema.to_arrow_schema()
    split = ParquetSplit(tuple(files), pafs.LocalFileSystem(), ("x", "y"),
                         (schema.field("x").type, schema.field("y").type),
                         tuple(tuple(f.row_group(g).num_rows for g in range(f.num_row_groups))
                               for f in footers))
    collate = ray_data.columns_collate(["x"], "y", "train")
    rows = [0] * world

    def read(rank: int) -> None:
        rows[rank] = count(ParquetTrain(split, collate, batch_size=256, rank=rank,
                                        world_size=world, seed=0))

    def both() -> int:
        threads = [threading.Thread(target=read, args=(r,)) for r in range(world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(rows)

    return world, timed(both)


def profile_table(prof: dict[str, Any]) -> Table:
    table = Table(title="Where a streamed epoch's read goes: each stage adds one step to the "
                        "one above (whole split, one process, fastest of the rounds)")
    for column in ("stage", "before s", "before share", "after s", "after share"):
        table.add_column(column)
    table.add_row("floor: pyarrow iter_batches(256) -> torch.from_numpy",
                  f"{prof['floor_s']:.2f}", "", f"{prof['floor_s']:.2f}", "")
    totals = {name: list(prof[name].values())[-1] for name in ("before", "after")}
    previous = {"before": 0.0, "after": 0.0}
    for stage in prof["before"]:
        cells = []
        for name in ("before", "after"):
            seconds = prof[name][stage]
            added = max(seconds - previous[name], 0.0)
            previous[name] = seconds
            cells += [f"{seconds:.2f} (+{added:.2f})", f"{added / totals[name]:.0%}"]
        table.add_row(stage, *cells)
    for name, seconds in prof.get("rank_reads_s", {}).items():
        table.add_row(f"ranks' own read (parquet_shards), {name} in threads", "", "",
                      f"{seconds:.2f}", "")
    return table


NAMES = {"map": "in memory (TensorDataset per worker)",
         "stream-before": "Ray Dataset, streamed before (6a14921)",
         "stream-ray": "Ray Dataset through Ray Data's stream (76a4462)",
         "stream": "Ray Dataset, each worker reads its rows",
         "stream-half-cpu-reads": "streamed now, read tasks of half a CPU",
         "pyarrow": "pyarrow loop in a torch IterableDataset"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=262144)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--store-mb", type=int, default=256)
    parser.add_argument("--modes", default="map,stream-before,stream-ray,stream,pyarrow",
                        help="the training splits to run, in this order (also: "
                             "stream-half-cpu-reads)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROUNDS",
                        help="first, the stream's stages timed in this process, ROUNDS times")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                             os.environ.get("PYTHONPATH")]))
    import ray

    from bench.streaming import write
    from orchestrator import train
    from orchestrator.start.console import Console as RunConsole
    from orchestrator.training.datasets import quiet_ray_data

    root = Path(tempfile.mkdtemp(prefix="ray-data-bench-"))
    write(str(root / "train"), args.rows, args.features)
    write(str(root / "val"), args.rows // 16, args.features, seed=1)
    size_mb = sum(p.stat().st_size for p in (root / "train").iterdir()) / 2**20
    # The object store caps what Ray Data holds at once; the workers get half a CPU each,
    # leaving Ray Data one for its read tasks.
    ray.init(address="local", object_store_memory=args.store_mb * 2**20,
             include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    quiet_ray_data()
    console = Console(record=True, width=130)
    prof = profile(root, args.features, args.profile) if args.profile else None
    if prof:
        console.print(profile_table(prof))
    quiet = RunConsole(stream=open(os.devnull, "w"))
    load = [os.getloadavg()[0]]  # the machine's other work, sampled before each mode and after
    rows = []
    for mode in args.modes.split(","):
        load.append(os.getloadavg()[0])
        with PeakMemory() as peak:
            summary = train(config(root, mode, args.epochs, args.features), console=quiet)
        steady = [h["epoch_seconds"] for h in summary.history[1:]]
        rows.append({"mode": mode, "epoch_s": statistics.median(steady), "epochs_s": steady,
                     "val_accuracy": summary.history[-1]["val_accuracy"],
                     "peak_rss_mb": max(peak.rss.values()) / 2**20,
                     "peak_uss_mb": max(peak.uss.values()) / 2**20})
    load.append(os.getloadavg()[0])
    ray.shutdown()

    base = next((r["epoch_s"] for r in rows if r["mode"] == "map"), rows[0]["epoch_s"])
    table = Table(title=f"{args.rows:,} training rows x {args.features} float32 "
                        f"({size_mb:,.0f} MB of Parquet), 2 workers, object store "
                        f"{args.store_mb} MB; epochs after the first; 1-min load average "
                        f"{min(load):.1f}-{max(load):.1f}")
    for column in ("training split", "epoch s median", "vs in memory", "val accuracy",
                   "peak RSS / worker MB", "peak USS / worker MB"):
        table.add_column(column)
    for row in rows:
        table.add_row(NAMES[row["mode"]], f"{row['epoch_s']:.2f}",
                      f"{row['epoch_s'] / base:.2f}x", f"{row['val_accuracy']:.4f}",
                      f"{row['peak_rss_mb']:,.0f}", f"{row['peak_uss_mb']:,.0f}")
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    stem = "ray_data" if args.rows == 262144 else f"ray_data_{args.rows}"
    (RESULTS / f"{stem}.txt").write_text(console.export_text())
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"rows": args.rows, "features": args.features, "parquet_mb": size_mb,
         "object_store_mb": args.store_mb, "epochs": args.epochs, "profile": prof,
         "results": rows, "load_average_1min": load,
         "when": time.strftime("%Y-%m-%d %H:%M")}, indent=1))
    shutil.rmtree(root, ignore_errors=True)  # the Parquet files and the runs


if __name__ == "__main__":
    main()
