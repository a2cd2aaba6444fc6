"""How long the CLI takes for commands that start no training: ``orchestrator --help`` and
``orchestrator best RUN`` (reads one JSON file), beside ``python -c pass``.

    .venv/bin/python -m bench.cli_startup [--repeats 5]

Each command runs ``--repeats`` times in a fresh interpreter, the three interleaved; the
table gives the median wall time and its ratio to the bare interpreter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def sample_run(root: Path) -> Path:
    """A finished run's directory as ``orchestrator best`` reads it: its summary.json."""
    run = root / "sample-run"
    best = run / "checkpoint_epoch0003"
    best.mkdir(parents=True)
    weights = bytes(range(256)) * 4096  # 1 MiB: ``best`` checks the file's sha256
    (best / "model.safetensors").write_bytes(weights)
    (best / "metadata.json").write_text(json.dumps({"epoch": 3, "files": {
        "model.safetensors": {"size": len(weights),
                              "sha256": hashlib.sha256(weights).hexdigest()}}}))
    summary = {"name": "sample-run", "run_dir": str(run), "best_epoch": 3,
               "epochs_completed": 5, "monitor": "val_loss", "mode": "min", "policy": "best",
               "best_checkpoint": str(best),
               "best_metrics": {"epoch": 3, "train_loss": 0.1, "val_loss": 0.2},
               "test_metrics": {"test_loss": 0.25}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = sample_run(Path(tmp))
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "orchestrator --help": [sys.executable, "-m", "orchestrator", "--help"],
            "orchestrator best RUN": [sys.executable, "-m", "orchestrator", "best", str(run)],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():
                started = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["python -c pass"])
    table = Table(title=f"CLI start-up, median of {args.repeats}")
    for column in ("command", "wall s", "x python -c pass"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for name, samples in times.items():
        median = statistics.median(samples)
        table.add_row(name, f"{median:.3f}", f"{median / base:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
