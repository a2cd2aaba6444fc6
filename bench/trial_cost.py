"""What a small search trial costs: the CLI's search against a plain Ray Tune function
trainable written by hand, the same trials side by side in one invocation.

    .venv/bin/python -m bench.trial_cost                 # 8 and 64 trials (ray_train: 8 only)
    .venv/bin/python -m bench.trial_cost --ray-train-64  # ray_train at 64 too (~10 min more)
    .venv/bin/python -m bench.trial_cost --pbt           # also PBT, in_trial and ray_train
    .venv/bin/python -m bench.trial_cost --two-workers   # also ours at 2 workers (8 trials)
    .venv/bin/python -m bench.trial_cost --quick         # a smoke run: 2 trials, plain, ours
                                                         # (--two-workers: ours_2w at 2 too)
    .venv/bin/python -m bench.trial_cost --variants plain,ours --trials 8

Every trial is the built-in digits workload (orchestrator/configs/digits.yaml: its entrypoint,
params, batch size and optimizer) trained for 1 epoch on 1 CPU, the whole validation split
scored at its end; the trials differ in their learning rate only (a grid of N values), 2 at a
time on a local Ray of this machine's 2 cores. Each search runs in a process of its own, so
that each starts cold and has its own Ray, and its wall time is that whole process's (the
interpreter, the imports, Ray's start and stop, every trial):

- **plain**: a Ray Tune function trainable as a user would write it by hand (the model
  trained in the trial's own process, ``tune.report`` once at the end),
  ``tune.Tuner(tune.with_resources(fn, {"cpu": 1}), ...)`` with ``max_concurrent_trials=2``,
  Ray started by ``ray.init(num_cpus=2)`` in the same process (``python -m bench.trial_cost
  _plain N DIR``).
- **ours**: ``python -m orchestrator tune orchestrator/configs/digits.yaml`` with one worker,
  one epoch, W&B disabled and ``tune.search_space={"train.lr": {"grid": [...]}}``: its default
  ``tune.one_worker_trials``.
- **ray_train**: the same with ``tune.one_worker_trials=ray_train`` (each trial a whole Ray
  Train run); "not available" where the CLI does not know the key. At 8 trials only unless
  ``--ray-train-64``.
- **ours_2w** (``--two-workers``): the same with ``scaling.num_workers=2`` and
  ``tune.max_concurrent_trials=1``: each trial's 2 workers take 1 CPU each, so one trial at a
  time on the 2 CPUs, each a Ray Train run (a one-worker trial only trains in its Tune
  trial's process). Its "vs plain" compares it with plain's 2 trials at a time all the same.
  At 8 trials or fewer only.

Every search must finish all N trials (Tune's results for plain; leaderboard.json's statuses
for the CLI). Targets: per trial at 64 trials within 1.2x of per trial at 8, and ours within
1.5x of plain at 8. ``--pbt``: 4 trials of 4 epochs, perturbation_interval 2, 2 at a time, once
with the default and once with ray_train: wall time, exploits (pbt.json) and wall per exploit.

Where a search's time goes, from Ray Tune's ``result.json`` of each trial (one line per
report: ``time_total_s``, the trainable's time since its start; ``timestamp``, a unix time in
whole seconds) and the search process's start and end (``time.time()`` here): the time before
the first trial's first report (the interpreter, the imports, Ray's start, the search's set-up
and the first trial's start), the median trial's start to its first report (ray_train: the
Ray Train run's controller, worker group and helper actors starting, then the workload's build
and the first epoch; in_trial: the build and the first epoch), the median first epoch itself
(its record's ``epoch_seconds``: training and evaluation on the worker; plain has none) and
the time after the last report until the process ended (the summaries, the test split scored,
the leaderboard, Ray's shutdown). ``timestamp``'s whole seconds make the first and last of
these good to about a second.

Writes bench/results/trial_cost.json (the raw timings) and .txt (the printed tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from workers.contract.names import LEADERBOARD_FILE, PBT_FILE, SUMMARY_FILE, TRIALS_DIR, TUNE_DIR

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CONFIG = "orchestrator/configs/digits.yaml"
VARIANTS = ("plain", "plain_reuse", "ours", "ray_train", "ours_2w")
DEFAULT_VARIANTS = ("plain", "plain_reuse", "ours", "ray_train")  # ours_2w: --two-workers
LABELS = {"plain": "plain Tune trainable", "plain_reuse": "plain, reuse_actors=True",
          "ours": "ours (default)",
          "ray_train": "ours, one_worker_trials=ray_train",
          "ours_2w": "ours, 2 workers, 1 trial at a time"}
SMALL_ONLY = {"ray_train": "--ray-train-64 runs it", "ours_2w": "2 workers: at 8 or fewer"}
ONE_WORKER_KEY = "tune.one_worker_trials"
PLAIN_LINE = '{"plain": '


def learning_rates(n: int) -> list[float]:
    """N distinct learning rates, geometrically spaced from 0.001 to 0.03 (3 digits)."""
    if n == 1:
        return [0.01]
    return [float(f"{0.001 * 30 ** (i / (n - 1)):.3g}") for i in range(n)]


# --- plain: what a user would write by hand ------------------------------------------------

def digits_settings() -> dict[str, Any]:
    data = yaml.safe_load((REPO / CONFIG).read_text())
    return {"entrypoint": data["workload"]["entrypoint"],
            "params": data["workload"].get("params") or {},
            "batch_size": data["train"]["batch_size"],
            "optimizer": data["train"].get("optimizer", "adam"),
            "seed": data.get("seed", 0)}


def train_digits(config: dict[str, Any]) -> None:
    """One trial: 1 epoch of the digits workload in this process, then the whole validation
    split's loss and accuracy, reported once."""
    import torch
    from ray import tune
    from torch.utils.data import DataLoader

    from workers.loop.learner import build_workload

    torch.manual_seed(config["seed"])
    workload = build_workload(config["entrypoint"], config["params"])
    model = workload.model
    # The project's built-in optimizer (workers/loop/optim.py), weight_decay 0.
    cls = torch.optim.AdamW if config["optimizer"] == "adamw" else torch.optim.Adam
    optimizer = cls(model.parameters(), lr=config["lr"])
    train = DataLoader(workload.train_dataset, batch_size=config["batch_size"], shuffle=True)
    model.train()
    for x, y in train:
        optimizer.zero_grad(set_to_none=True)
        workload.loss_fn(model(x), y).backward()
        optimizer.step()
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for x, y in DataLoader(workload.val_dataset, batch_size=config["batch_size"]):
            out = model(x)
            loss_sum += float(workload.loss_fn(out, y)) * len(y)  # a mean over the batch
            correct += int((out.argmax(dim=1) == y).sum())
            seen += len(y)
    tune.report({"val_loss": loss_sum / seen, "val_accuracy": correct / seen})


def plain_search(trials: int, out: Path, reuse: bool = False) -> None:
    """The plain variant in this process: Ray started here, N trials, their results as one
    JSON line (the parent times the whole process)."""
    started = time.perf_counter()
    import ray
    from ray import tune

    ray.init(num_cpus=2)
    ray_up = time.perf_counter()
    settings = digits_settings()
    tuner = tune.Tuner(
        tune.with_resources(train_digits, {"cpu": 1}),
        param_space={**settings, "lr": tune.grid_search(learning_rates(trials))},
        tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=reuse),
        run_config=tune.RunConfig(storage_path=str(out), name="plain", verbose=0),
    )
    grid = tuner.fit()
    fitted = time.perf_counter()
    results = [grid[i] for i in range(len(grid))]
    ray.shutdown()
    losses = [r.metrics["val_loss"] for r in results
              if r.error is None and r.metrics and "val_loss" in r.metrics]
    print(PLAIN_LINE + json.dumps({
        "trials": len(results), "completed": len(losses),
        "best_val_loss": min(losses, default=None),
        "ray_init_s": ray_up - started, "fit_s": fitted - ray_up,
        "shutdown_s": time.perf_counter() - fitted,
    }) + "}")


# --- running each search in a process of its own ------------------------------------------

def child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # each search starts a Ray of its own
    return env


def timed(command: list[str], log: Path) -> dict[str, Any]:
    """The command's exit code, wall seconds and unix start and end times (``time.time()``,
    to set against Tune's ``timestamp``s), its output to ``log``."""
    with log.open("w") as sink:
        started_at, started = time.time(), time.perf_counter()
        code = subprocess.run(command, cwd=REPO, env=child_env(), stdout=sink,
                              stderr=subprocess.STDOUT, check=False).returncode
        wall, ended_at = time.perf_counter() - started, time.time()
    return {"exit_code": code, "wall_s": wall, "started_at": started_at, "ended_at": ended_at}


# --- where a search's time goes: Ray Tune's result.json of each trial ----------------------

def tune_results(paths: list[Path]) -> list[list[dict[str, Any]]]:
    """Each trial's reports (its result.json, a JSON object a line), those with none left
    out."""
    trials = []
    for path in sorted(paths):
        lines = [json.loads(line) for line in path.read_text(errors="replace").splitlines()
                 if line.strip()]
        if lines:
            trials.append(lines)
    return trials


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def where_time(row: dict[str, Any], paths: list[Path],
               summaries: list[Path] | None = None) -> dict[str, Any]:
    """The search's time before its first report, each trial's start to its first report
    and its first epoch (medians), and the time after its last report (see the module's
    docstring)."""
    trials = tune_results(paths)
    out: dict[str, Any] = {"trials_reported": len(trials), "reports": sum(map(len, trials))}
    if trials:
        stamps = [float(r["timestamp"]) for lines in trials for r in lines if "timestamp" in r]
        firsts = [lines[0] for lines in trials]
        out.update(
            before_first_report_s=min(stamps) - row["started_at"] if stamps else None,
            first_report_s=median([float(r["time_total_s"]) for r in firsts
                                   if "time_total_s" in r]),
            epoch_s=median([float(r["epoch_seconds"]) for r in firsts
                            if "epoch_seconds" in r]),
            after_last_report_s=row["ended_at"] - max(stamps) if stamps else None,
        )
    if summaries is not None:  # the CLI's: each trial's trained_in
        trained_in: dict[str, int] = {}
        for path in summaries:
            where = json.loads(path.read_text()).get("trained_in", "unknown")
            trained_in[where] = trained_in.get(where, 0) + 1
        out["trained_in"] = trained_in
    return out


def tail(log: Path, chars: int = 1500) -> str:
    return log.read_text(errors="replace")[-chars:]


def run_plain(root: Path, trials: int, variant: str = "plain") -> dict[str, Any]:
    out, log = root / f"{variant}-{trials}", root / f"{variant}-{trials}.log"
    row: dict[str, Any] = {"variant": variant, "trials": trials, "log": str(log),
                           **timed([sys.executable, "-m", "bench.trial_cost", "_plain",
                                    str(trials), str(out),
                                    *(["reuse"] if variant == "plain_reuse" else [])], log)}
    # Tune's own directory (plain_search's RunConfig: storage_path=out, name="plain").
    row["where"] = where_time(row, list((out / "plain").glob("*/result.json")))
    code = row["exit_code"]
    line = next((line for line in reversed(log.read_text(errors="replace").splitlines())
                 if line.startswith(PLAIN_LINE)), None)
    if code != 0 or line is None:
        return {**row, "status": f"failed (exit {code})", "tail": tail(log)}
    inner = json.loads(line)["plain"]
    inner["trials_run"] = inner.pop("trials")
    ok = inner["trials_run"] == trials and inner["completed"] == trials
    return {**row, **inner, "status": "ok" if ok else "incomplete"}


def cli_search(root: Path, name: str, sets: list[str], workers: int = 1) -> dict[str, Any]:
    """One ``orchestrator tune`` of the digits config, timed; its leaderboard read back."""
    storage, log = root / "runs", root / f"{name}.log"
    command = [sys.executable, "-m", "orchestrator", "tune", CONFIG,
               "--set", f"scaling.num_workers={workers}", "--set", "wandb.mode=disabled",
               "--set", f"storage_path={storage}", "--set", f"name={name}"]
    for item in sets:
        command += ["--set", item]
    row: dict[str, Any] = {**timed(command, log), "log": str(log), "command": command}
    code = row["exit_code"]
    search = storage / name
    row["where"] = where_time(row, list(search.glob(f"{TUNE_DIR}/attempt-*/*/result.json")),
                              list(search.glob(f"{TRIALS_DIR}/*/{SUMMARY_FILE}")))
    text = log.read_text(errors="replace")
    if code == 2 and ONE_WORKER_KEY in text:
        return {**row, "status": "not available", "tail": tail(log, 400)}
    board_path = search / LEADERBOARD_FILE
    if not board_path.is_file():
        return {**row, "status": f"failed (exit {code})", "tail": tail(log)}
    board = json.loads(board_path.read_text())["trials"]
    statuses = [trial["status"] for trial in board]
    row.update(trials_run=len(board), completed=statuses.count("completed"),
               statuses=statuses, search_dir=str(search))
    return row


def run_ours(root: Path, variant: str, trials: int) -> dict[str, Any]:
    space = json.dumps({"train.lr": {"grid": learning_rates(trials)}})
    two = variant == "ours_2w"  # 2 workers of 1 CPU each: one trial at a time on 2 CPUs
    sets = ["train.epochs=1", "tune.num_samples=1",
            f"tune.max_concurrent_trials={1 if two else 2}", f"tune.search_space={space}"]
    if variant == "ray_train":
        sets.append(f"{ONE_WORKER_KEY}=ray_train")
    row = {"variant": variant, "trials": trials,
           **cli_search(root, f"{variant}-{trials}", sets, workers=2 if two else 1)}
    if "status" not in row:
        ok = (row["exit_code"] == 0 and row["trials_run"] == trials
              and row["completed"] == trials)
        row["status"] = "ok" if ok else f"incomplete (exit {row['exit_code']})"
    return row


def run_pbt(root: Path, variant: str) -> dict[str, Any]:
    """4 trials of 4 epochs, an exploit/explore step every 2 epochs, 2 at a time (the shape of
    tests/integration/test_search_pbt.py), on digits."""
    space = json.dumps({"train.lr": {"loguniform": [0.0002, 0.05]}})
    sets = ["train.epochs=4", "tune.scheduler=pbt", "tune.perturbation_interval=2",
            "tune.num_samples=4", "tune.max_concurrent_trials=2", "tune.seed=5",
            f"tune.search_space={space}"]
    if variant == "ray_train":
        sets.append(f"{ONE_WORKER_KEY}=ray_train")
    row = {"variant": variant, **cli_search(root, f"pbt-{variant}", sets)}
    if "status" in row:
        return row
    pbt = Path(row["search_dir"]) / PBT_FILE
    row["exploits"] = len(json.loads(pbt.read_text())["exploits"]) if pbt.is_file() else 0
    ok = row["exit_code"] == 0 and row["trials_run"] == 4 and row["completed"] == 4
    row["status"] = "ok" if ok else f"incomplete (exit {row['exit_code']})"
    return row


# --- tables -------------------------------------------------------------------------------

def skipped_caption(skipped: dict[str, list[int]]) -> str | None:
    return "; ".join(f"{variant} not run at {', '.join(map(str, counts))} trials "
                     f"({SMALL_ONLY[variant]})"
                     for variant, counts in skipped.items()) or None


def main_table(rows: list[dict[str, Any]], skipped: dict[str, list[int]]) -> Table:
    title = ("one-epoch digits trials, 1 CPU each, 2 at a time, each search in its own "
             f"process and Ray ({os.cpu_count()} cores)")
    notes = [skipped_caption(skipped)]
    if any(r["variant"] == "ours_2w" for r in rows):
        notes.append("ours_2w: 2 workers of 1 CPU a trial, 1 trial at a time, each a Ray "
                     "Train run; vs plain's 1 worker, 2 at a time")
    caption = "\n".join(n for n in notes if n) or None
    table = Table(title=title, caption=caption)
    for column in ("variant", "trials", "finished", "wall s", "per trial s", "vs plain"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    plain = {r["trials"]: r["wall_s"] for r in rows
             if r["variant"] == "plain" and r["status"] == "ok"}
    for r in rows:
        label = LABELS[r["variant"]]
        if r["status"] == "not available":
            table.add_row(label, str(r["trials"]), "not available", "", "", "")
            continue
        finished = f"{r.get('completed', 0)}/{r['trials']}"
        if r["status"] != "ok":
            finished += f" ({r['status']})"
        base = plain.get(r["trials"])
        table.add_row(label, str(r["trials"]), finished, f"{r['wall_s']:.1f}",
                      f"{r['wall_s'] / r['trials']:.2f}",
                      f"{r['wall_s'] / base:.2f}x" if base else "")
    return table


def where_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="where a search's time goes (medians over its trials; Tune's "
                        "result.json)",
                  caption="before / after: from the search process's start to the first "
                          "trial's first report, and from the last report to the process's "
                          "end (Tune's timestamps: whole seconds)")
    for column in ("variant", "trials", "before first report s",
                   "start→first report per trial (median) s", "epoch s (median)",
                   "after last report s", "wall s"):
        table.add_column(column, justify="left" if column == "variant" else "right",
                         no_wrap=column == "variant")

    def cell(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for r in rows:
        where = r.get("where")
        if where is None or "wall_s" not in r:
            continue
        label = r["variant"]
        if where.get("trained_in"):
            label += " (" + ", ".join(f"{k} {v}" for k, v in where["trained_in"].items()) + ")"
        if not where["trials_reported"]:
            table.add_row(label, str(r["trials"]), "no reports", "", "", "",
                          f"{r['wall_s']:.1f}")
            continue
        table.add_row(label, str(r["trials"]), cell(where["before_first_report_s"]),
                      cell(where["first_report_s"]), cell(where["epoch_s"], 2),
                      cell(where["after_last_report_s"]), f"{r['wall_s']:.1f}")
    return table


def checks(rows: list[dict[str, Any]], counts: list[int]) -> list[dict[str, Any]]:
    """The ratios the targets are about, from the rows that finished every trial."""
    per = {(r["variant"], r["trials"]): r["wall_s"] / r["trials"] for r in rows
           if r["status"] == "ok"}
    small, large = min(counts), max(counts)
    out = []

    def add(what: str, a: tuple[str, int], b: tuple[str, int], target: float | None) -> None:
        if a in per and b in per:
            ratio = per[a] / per[b]
            out.append({"check": what, "ratio": ratio, "target": target,
                        "met": None if target is None else ratio <= target})

    if large != small:
        for variant in ("plain", "plain_reuse", "ours", "ray_train"):
            add(f"{LABELS[variant]}: per trial at {large} / at {small}",
                (variant, large), (variant, small), 1.2 if variant != "ray_train" else None)
    for n in sorted(set(counts)):
        add(f"ours / plain at {n}", ("ours", n), ("plain", n), 1.5 if n == small else None)
        add(f"ours / plain, reuse_actors=True at {n}", ("ours", n), ("plain_reuse", n),
            1.5 if n == small else None)
        add(f"ray_train / plain at {n}", ("ray_train", n), ("plain", n), None)
        add(f"ours / ray_train at {n}", ("ours", n), ("ray_train", n), None)
    return out


def checks_table(found: list[dict[str, Any]]) -> Table:
    table = Table(title="what grows with the number of trials, and ours against plain")
    for column in ("ratio", "value", "target", "met"):
        table.add_column(column, justify="left" if column == "ratio" else "right")
    for c in found:
        target = f"<= {c['target']}x" if c["target"] is not None else ""
        met = "" if c["met"] is None else ("yes" if c["met"] else "no")
        table.add_row(c["check"], f"{c['ratio']:.2f}x", target, met)
    return table


def pbt_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="PBT on digits: 4 trials x 4 epochs, perturbation_interval 2, "
                        "2 at a time")
    for column in ("variant", "finished", "wall s", "exploits", "wall s per exploit",
                   "vs default"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    base = next((r["wall_s"] for r in rows if r["variant"] == "ours" and r["status"] == "ok"),
                None)
    for r in rows:
        label = LABELS[r["variant"]]
        if r["status"] == "not available":
            table.add_row(label, "not available", "", "", "", "")
            continue
        finished = f"{r.get('completed', 0)}/4" + ("" if r["status"] == "ok"
                                                   else f" ({r['status']})")
        exploits = r.get("exploits", 0)
        table.add_row(label, finished, f"{r['wall_s']:.1f}", str(exploits),
                      f"{r['wall_s'] / exploits:.1f}" if exploits else "",
                      f"{r['wall_s'] / base:.2f}x" if base and r["status"] == "ok" else "")
    return table


# --- main ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.trial_cost",
                                description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, run in this order: {', '.join(VARIANTS)}")
    p.add_argument("--trials", default="8,64", help="comma-separated trial counts")
    p.add_argument("--ray-train-64", action="store_true",
                   help="run ray_train at every trial count (else only at 8 or fewer)")
    p.add_argument("--pbt", action="store_true",
                   help="also a PBT search, with the default and with ray_train")
    p.add_argument("--two-workers", action="store_true",
                   help="also ours_2w: 2 workers a trial, 1 trial at a time (at 8 or fewer)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 trials, plain and ours")
    p.add_argument("--keep", action="store_true",
                   help="keep the searches' directories and logs (printed at the end)")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.variants = "2", "plain,ours"
    args.counts = [int(n) for n in args.trials.split(",") if n.strip()]
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.two_workers and "ours_2w" not in args.variant_list:
        args.variant_list.append("ours_2w")
    unknown = set(args.variant_list) - set(VARIANTS)
    if unknown or not args.counts or min(args.counts) < 1:
        p.error(f"--variants: one of {', '.join(VARIANTS)}; --trials: counts >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_plain"]:
        plain_search(int(argv[1]), Path(argv[2]), reuse=argv[3:4] == ["reuse"])
        return
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="trial-cost-"))
    rows: list[dict[str, Any]] = []
    skipped: dict[str, list[int]] = {}
    ray_train_missing = False
    started = time.perf_counter()
    for trials in args.counts:
        for variant in args.variant_list:
            if trials > 8 and (variant == "ours_2w"
                               or (variant == "ray_train" and not args.ray_train_64)):
                skipped.setdefault(variant, []).append(trials)
                continue
            if variant == "ray_train" and ray_train_missing:
                rows.append({"variant": variant, "trials": trials, "status": "not available"})
                continue
            row = (run_plain(root, trials, variant) if variant.startswith("plain")
                   else run_ours(root, variant, trials))
            ray_train_missing |= variant == "ray_train" and row["status"] == "not available"
            rows.append(row)
            print(f"{LABELS[variant]}, {trials} trials: {row['status']}"
                  + (f", {row['wall_s']:.1f} s" if "wall_s" in row else ""), flush=True)
    pbt_rows = []
    if args.pbt:
        for variant in ("ours", "ray_train"):
            row = run_pbt(root, variant)
            pbt_rows.append(row)
            print(f"PBT, {LABELS[variant]}: {row['status']}, {row['wall_s']:.1f} s", flush=True)

    found = checks(rows, args.counts)
    console = Console(record=True, width=130)
    console.print(main_table(rows, skipped))
    console.print(where_table(rows))
    if found:
        console.print(checks_table(found))
    if pbt_rows:
        console.print(pbt_table(pbt_rows))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "trial_cost.txt").write_text(console.export_text())
    (RESULTS / "trial_cost.json").write_text(json.dumps({
        "when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
        "python": platform.python_version(), "argv": argv, "config": CONFIG,
        "learning_rates": {n: learning_rates(n) for n in args.counts},
        "results": rows, "checks": found, "pbt": pbt_rows,
        "where_time_goes": [{"variant": r["variant"], "trials": r["trials"],
                             "wall_s": r["wall_s"], **r["where"]}
                            for r in rows if "where" in r],
        "total_s": time.perf_counter() - started,
    }, indent=1))
    failed = [r for r in rows + pbt_rows if r["status"] not in ("ok", "not available")]
    if args.keep or failed:
        print(f"searches and logs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {RESULTS / 'trial_cost.json'} and {RESULTS / 'trial_cost.txt'}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
