"""Searches measured side by side, each search in a driver process of its own.

    .venv/bin/python -m bench.search searchers   # 8 trials of digits: random against optuna
    .venv/bin/python -m bench.search scale       # 64 one-epoch trials against 8, 8 at a time

``searchers``: the built-in digits workload, 2 epochs a trial, 1 worker each, 2 trials at a
time on the local Ray: the search's wall time, and what choosing the trials cost the driver
(drawing all 8 up front, or Optuna's proposal each time a slot frees).

``scale``: a local Ray given 8 logical CPUs (``RAY_OVERRIDE_RESOURCES``) on this machine's
2 cores, one-epoch trials of the same workload 8 at a time, W&B offline: every trial on the
leaderboard and with its W&B run, the driver's peak memory (its own, ``ru_maxrss``) and wall
time per trial, 64 trials against 8. The ratios show what grows with the number of trials.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
SPACE = {"train.lr": {"loguniform": [0.0003, 0.03]},
         "workload.params.hidden": {"choice": [32, 64, 128]}}


def config(root: Path, name: str, search: str, trials: int, concurrent: int,
           epochs: int, wandb: str) -> dict:
    return {
        "name": name, "storage_path": str(root / "runs"),
        "workload": {"entrypoint": "workers.workloads.digits:build"},
        "scaling": {"num_workers": 1}, "train": {"epochs": epochs, "batch_size": 64},
        "wandb": {"mode": wandb},
        "tune": {"search": search, "num_samples": trials, "max_concurrent_trials": concurrent,
                 "seed": 3, "search_space": SPACE},
    }


def one(args: argparse.Namespace) -> None:
    """One search in this process; prints its measurements as one JSON line."""
    from orchestrator.search import adaptive
    from orchestrator.search.plan import plan_search
    from orchestrator.search.runner import run_search
    from orchestrator.start.console import Console as RunConsole
    from workers.contract.config import RunConfig

    cfg = RunConfig.model_validate(json.loads(args.config))
    proposing: list[float] = []
    suggest = adaptive.BestValueOptunaSearch.suggest

    def timed(self, trial_id):  # the searcher's own cost, each time Tune asks it
        started = time.perf_counter()
        try:
            return suggest(self, trial_id)
        finally:
            proposing.append(time.perf_counter() - started)

    adaptive.BestValueOptunaSearch.suggest = timed
    if cfg.tune.search != "optuna":  # drawn up front: the whole plan, validation included
        started = time.perf_counter()
        plan_search(cfg, tempfile.mkdtemp())
        proposing.append(time.perf_counter() - started)
    started = time.perf_counter()
    board = run_search(cfg, console=RunConsole(stream=open(os.devnull, "w")))
    wall = time.perf_counter() - started
    logged = sum(1 for row in board if (row.get("wandb") or {}).get("run"))
    print(json.dumps({
        "wall_s": wall, "trials": len(board),
        "completed": sum(row["status"] == "completed" for row in board),
        "in_wandb": logged, "choosing_s": sum(proposing), "asks": len(proposing),
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def measure(cfg: dict, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.search", "one", json.dumps(cfg)],
                         cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"search {cfg['name']} failed:\n{out.stderr[-3000:]}")
    # The search's own output (W&B's offline lines) comes before the measurements' line.
    line = next(line for line in reversed(out.stdout.splitlines())
                if line.startswith('{"wall_s"'))
    return json.loads(line)


def searchers(root: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    rows = []
    for search in ("random", "optuna"):
        result = measure(config(root, search, search, 8, 2, 2, "disabled"), env)
        rows.append({"search": search, **result})
    table = Table(title="8 trials of digits (2 epochs, 1 worker each), 2 at a time, 2 cores")
    for column in ("search", "wall s", "vs random", "choosing the trials s", "per trial ms"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["search"], f"{row['wall_s']:.1f}",
                      f"{row['wall_s'] / rows[0]['wall_s']:.2f}x", f"{row['choosing_s']:.3f}",
                      f"{1000 * row['choosing_s'] / row['trials']:.1f}")
    Console().print(table)
    return rows


def scale(root: Path) -> list[dict]:
    # The local Ray each driver starts gets 8 logical CPUs (Ray's own override of what it
    # detects), so that 8 one-worker trials run at once on this machine's 2 cores.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_OVERRIDE_RESOURCES": '{"CPU": 8}',
           "WANDB_DIR": str(root)}
    env.pop("RAY_ADDRESS", None)
    rows = []
    for trials in (8, 64):
        result = measure(config(root, f"scale-{trials}", "random", trials, 8, 1, "offline"),
                         env)
        rows.append({"trials": trials, **result})
    table = Table(title="one-epoch trials of digits, 8 at a time on 8 logical CPUs (2 cores), "
                        "W&B offline")
    for column in ("trials", "on the leaderboard", "with a W&B run", "wall s",
                   "s per trial", "driver peak RSS MB", "RSS vs 8 trials",
                   "s per trial vs 8 trials"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["trials"]), str(row["completed"]), str(row["in_wandb"]),
                      f"{row['wall_s']:.1f}", f"{row['wall_s'] / row['trials']:.2f}",
                      f"{row['driver_peak_rss_mb']:.0f}",
                      f"{row['driver_peak_rss_mb'] / rows[0]['driver_peak_rss_mb']:.2f}x",
                      f"{row['wall_s'] / row['trials'] / (rows[0]['wall_s'] / 8):.2f}x")
    Console().print(table)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=("searchers", "scale", "one"))
    parser.add_argument("config", nargs="?")
    parser.add_argument("--out", help="write the measurements here as JSON")
    args = parser.parse_args()
    if args.part == "one":
        one(args)
        return
    root = Path(tempfile.mkdtemp(prefix="search-bench-"))
    rows = searchers(root) if args.part == "searchers" else scale(root)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
