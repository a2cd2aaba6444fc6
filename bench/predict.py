"""``orchestrator predict`` (a Ray Data job over an actor pool) against a one-process loop over
the same rows (pyarrow reads the Parquet files batch by batch, the model scores them in
torch), side by side in one run: rows/s of each and their ratio, and the largest difference
between their logits (they must agree).

The model is the built-in ``digits_parquet`` workload's MLP (64 inputs, ``--hidden`` units,
10 classes), its weights seeded; the rows are synthetic ``pixels`` in ``--files`` files.

    .venv/bin/python -m bench.predict [--rows 200000] [--hidden 1024] [--actors 2]
                                      [--batch-size 1024] [--files 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def write_rows(where: Path, rows: int, files: int, seed: int = 0) -> float:
    """``rows`` rows of 64 float32 ``pixels`` in ``files`` Parquet files; their MB."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index, part in enumerate(np.array_split(np.arange(rows), files)):
        values = rng.standard_normal((len(part), 64), dtype=np.float32)
        pixels = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), 64)
        pq.write_table(pa.table({"pixels": pixels}), where / f"part-{index:03d}.parquet")
    return sum(p.stat().st_size for p in where.iterdir()) / 2**20


def write_run(root: Path, hidden: int) -> tuple[Path, Any]:
    """A finished digits_parquet run, written as the project writes one (no training): its
    best checkpoint holds seeded weights. Returns the run directory and the model."""
    import pyarrow.fs as pafs
    import torch

    from workers.checkpoint.snapshot import snapshot
    from workers.checkpoint.writer import write_checkpoint
    from workers.contract.config import RunConfig
    from workers.workloads.digits_parquet import build

    params = {"data_dir": str(root / "digits"), "hidden": hidden}
    cfg = RunConfig.model_validate({
        "name": "bench-predict", "storage_path": str(root / "runs"), "seed": 0,
        "workload": {"entrypoint": "workers.workloads.digits_parquet:build", "params": params}})
    torch.manual_seed(0)
    model = build(**params).model.eval()
    run_dir = root / "runs" / "bench-predict"
    checkpoint = run_dir / "checkpoint_epoch0001_1"
    metadata = {"epoch": 1, "val_loss": 1.0, "monitor": "val_loss", "mode": "min",
                "is_best": True, "saved_because": "best", "config": cfg.to_dict()}
    write_checkpoint(snapshot(model.state_dict(), None, {"epoch": 1}, metadata),
                     pafs.LocalFileSystem(), str(checkpoint))
    (run_dir / "summary.json").write_text(json.dumps(
        {"monitor": "val_loss", "best_checkpoint": str(checkpoint)}))
    return run_dir, model


def one_process(model: Any, data: Path, batch_size: int) -> tuple[float, np.ndarray]:
    """(seconds, logits in row order): every file read with pyarrow, batch by batch, each
    batch through the model in torch, its logits and argmax kept, as predict keeps them."""
    import pyarrow.parquet as pq
    import torch

    start = time.perf_counter()
    outputs, predicted = [], []
    for file in sorted(data.glob("*.parquet")):
        for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size):
            pixels = batch.column("pixels")
            x = torch.from_numpy(pixels.flatten().to_numpy().reshape(len(pixels), -1).copy())
            with torch.inference_mode():
                logits = model(x)
            outputs.append(logits.numpy())
            predicted.append(logits.argmax(dim=1).numpy())
    return time.perf_counter() - start, np.concatenate(outputs)


def read_logits(out: Path) -> np.ndarray:
    """predict's logits, in row-id order."""
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    logits = table.column("logits").combine_chunks()
    values = logits.flatten().to_numpy().reshape(len(table), -1)
    return values[np.argsort(table.column("row_id").to_numpy())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--files", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)  # the actors import the project from the working directory
    import torch

    from orchestrator import predict
    from orchestrator.start.cluster import init_ray
    from orchestrator.start.console import Console as RunConsole

    root = Path(tempfile.mkdtemp(prefix="predict-bench-"))
    size_mb = write_rows(root / "rows", args.rows, args.files)
    init_ray()  # before the workload builds its Ray Datasets
    run_dir, model = write_run(root, args.hidden)

    loop_s, expected = one_process(model, root / "rows", args.batch_size)
    start = time.perf_counter()
    result = predict(run_dir, data=str(root / "rows"), out=str(root / "out"),
                     num_actors=args.actors, batch_size=args.batch_size,
                     console=RunConsole(stream=open(os.devnull, "w")))
    call_s = time.perf_counter() - start
    diff = float(np.abs(read_logits(root / "out") - expected).max())

    rows = [
        {"way": "one-process loop (pyarrow + torch)", "seconds": loop_s},
        {"way": f"predict, {args.actors} actors: the job", "seconds": result.seconds},
        {"way": f"predict, {args.actors} actors: the whole call", "seconds": call_s},
    ]
    for row in rows:
        row["rows_per_s"] = args.rows / row["seconds"]
        row["vs_loop"] = row["rows_per_s"] / rows[0]["rows_per_s"]
    console = Console(record=True, width=130)
    table = Table(title=f"{args.rows:,} rows x 64 float32 ({size_mb:,.0f} MB of Parquet, "
                        f"{args.files} files), MLP 64-{args.hidden}-10, batch "
                        f"{args.batch_size}, {os.cpu_count()} cores, torch threads "
                        f"{torch.get_num_threads()} in the loop; logits max abs diff "
                        f"{diff:.2g}")
    for column in ("way", "seconds", "rows/s", "vs the loop"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["way"], f"{row['seconds']:.2f}", f"{row['rows_per_s']:,.0f}",
                      f"{row['vs_loop']:.2f}x")
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "predict.txt").write_text(console.export_text())
    (RESULTS / "predict.json").write_text(json.dumps(
        {"rows": args.rows, "hidden": args.hidden, "actors": args.actors,
         "batch_size": args.batch_size, "files": args.files, "parquet_mb": size_mb,
         "max_abs_diff": diff, "results": rows, "when": time.strftime("%Y-%m-%d %H:%M")},
        indent=1))


if __name__ == "__main__":
    main()
