"""``model_card.md``: the best model's card, in Hugging Face's model-card format (YAML front
matter with ``model-index``, then Markdown), written from the run's own record.

A run's card is built from its ``summary.json`` (``card_text``), at the end of every run
(``results.summary.finalize_run``, which also hands it to the best model's W&B artifact) and
by ``orchestrator card RUN``; a search's (``search_card_text``) from ``leaderboard.json`` and the
best trial's ``summary.json``, for the exported ``best_model/``. Every number is written with
``repr`` (Markdown) or by PyYAML (front matter), which both round-trip a float exactly: a
reader parsing the card gets the summary's numbers back. The card holds no code to run: its
Python blocks are text for a reader.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator import storage
from orchestrator.errors import UserError
from workers.contract.names import (
    BEST_DIR,
    CARD_FILE,
    LEADERBOARD_FILE,
    MODEL_FILE,
    PLOT_FILE,
    SUMMARY_FILE,
    TRIALS_DIR,
)

EXPORT_DIR = "export"  # ``orchestrator export``'s output (each check a JSON beside its file)
TOP_ROWS = 5  # a search's card lists the leaderboard's first rows
RECORD_KEYS = ("epoch", "step", "global_step")  # where an evaluation falls, not a metric


def number(value: Any) -> str:
    """A number as the card writes it: ``repr`` (exact for floats), ``null`` for None."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    return str(value)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """A record's numbers, in its order (booleans and text left out)."""
    return {k: v for k, v in (record or {}).items() if is_number(v)}


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; cells are ``number``'s text (``|`` escaped)."""
    def cell(v: Any) -> str:
        return number(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def redacted(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as the card shows it: a ``user:password@`` in ``storage_path`` masked (the
    config holds no other secret: credentials come from the environment, never recorded)."""
    out = json.loads(json.dumps(config))
    path = out.get("storage_path")
    if isinstance(path, str):
        out["storage_path"] = re.sub(r"(://)[^/@]*@", r"\1***@", path)
    return out


# -- front matter ------------------------------------------------------------------------------
def front_matter(name: str, summary: Mapping[str, Any]) -> str:
    import yaml

    cfg = summary.get("config") or {}
    best = numeric(summary.get("best_metrics"))
    results: list[dict[str, Any]] = []
    dataset: dict[str, Any] = {"type": (cfg.get("workload") or {}).get("entrypoint", "unknown"),
               "name": (cfg.get("workload") or {}).get("entrypoint", "unknown")}
    val = [{"type": k, "value": v, "name": f"{k} (best evaluation)"}
           for k, v in best.items() if k.startswith(("train_", "val_"))]
    if val:
        results.append({"task": {"type": "other", "name": "best evaluation"},
                        "dataset": {**dataset, "split": "validation"}, "metrics": val})
    test = numeric(summary.get("test_metrics"))
    if test:
        results.append({"task": {"type": "other", "name": "test split, best weights"},
                        "dataset": {**dataset, "split": "test"},
                        "metrics": [{"type": k, "value": v, "name": k} for k, v in test.items()]})
    meta = {"library_name": "pytorch",
            "tags": ["pytorch", "ray-train", "ray-best-model-orchestrator",
                     f"engine-{cfg.get('engine', 'torch')}"],
            "model-index": [{"name": name, "results": results}]}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


# -- sections ----------------------------------------------------------------------------------
def why_it_won(summary: Mapping[str, Any]) -> list[str]:
    """The monitor, its direction and the best evaluation against the runner-up and the best
    before it."""
    monitor, mode = summary.get("monitor"), summary.get("mode")
    history = summary.get("history") or []
    best = summary.get("best_metrics")
    lines = [f"- monitor: `{monitor}`, mode: `{mode}` ({summary.get('mode_source', '')})",
             f"- policy: `{summary.get('policy')}`, status: `{summary.get('status')}`, "
             f"epochs completed: {number(summary.get('epochs_completed'))} of "
             f"{number(summary.get('epochs_planned'))}"]
    if summary.get("stop_reason"):
        lines.append(f"- stopped early: {summary['stop_reason']}")
    if not best:
        return [*lines, "- no evaluation improved on the monitor: there is no best model"]
    value = best.get(monitor)
    lines.append(f"- best evaluation: epoch {number(best.get('epoch'))}"
                 + (f", global step {number(best.get('global_step'))}"
                    if best.get("global_step") is not None else "")
                 + f": `{monitor}` = {number(value)}")
    at = (best.get("epoch"), best.get("global_step"))
    others = [r for r in history if (r.get("epoch"), r.get("global_step")) != at
              and is_number(r.get(monitor)) and math.isfinite(r[monitor])]
    if others:
        pick = min if mode == "min" else max
        runner = pick(others, key=lambda r: r[monitor])
        lines.append(f"- runner-up: epoch {number(runner['epoch'])}: `{monitor}` = "
                     f"{number(runner[monitor])} (the best is better by "
                     f"{number(abs(runner[monitor] - value)) if is_number(value) else 'null'})")
    before = [r for r in history if r.get("is_best")
              and (r.get("epoch"), r.get("global_step") or 0) < (at[0], at[1] or 0)]
    if before:
        lines.append(f"- previous best: epoch {number(before[-1]['epoch'])}: `{monitor}` = "
                     f"{number(before[-1].get(monitor))}")
    lines.append("- the best is the strictly best value seen (a tie is no improvement; NaN "
                 "and inf never are)")
    return lines


def best_section(summary: Mapping[str, Any]) -> list[str]:
    out = ["## Every metric of the best evaluation", ""]
    best = numeric(summary.get("best_metrics"))
    out.append(table(["metric", "value"], list(best.items())) if best else "none")
    out += ["", "## Test split (scored once, with the best weights)", ""]
    test = numeric(summary.get("test_metrics"))
    if test:
        out.append(table(["metric", "value"], list(test.items())))
    elif summary.get("test_error"):
        out.append(f"not scored: {summary['test_error']}")
    else:
        out.append("no test split (or the policy did not keep the best model)")
    return out


def more_bests(summary: Mapping[str, Any]) -> list[str]:
    """``keep_top_k``, ``average_top_k`` and ``also_monitor``, where the run has them."""
    out: list[str] = []
    ranked = summary.get("best_checkpoints")
    if ranked:
        out += ["", "## The K best models (checkpoint.keep_top_k)", "",
                table(["rank", "epoch", "global_step", "value", "path"],
                      [[c.get("rank"), c.get("epoch"), c.get("global_step"), c.get("value"),
                        c.get("path")] for c in ranked])]
    averaged = summary.get("averaged")
    if averaged:
        out += ["", "## Average of the K best (checkpoint.average_top_k)", "",
                table(["k", "value", "best_value", "by", "won"],
                      [[averaged.get("k"), averaged.get("value"), averaged.get("best_value"),
                        averaged.get("by"), averaged.get("won")]])]
        if averaged.get("metrics"):
            out += ["", table(["metric (the average's)", "value"],
                              list(numeric(averaged["metrics"]).items()))]
    by_monitor = summary.get("best_by_monitor")
    if by_monitor:
        out += ["", "## Each monitor's best (tracker.also_monitor)", "",
                table(["monitor", "mode", "value", "epoch", "checkpoint"],
                      [[m, b.get("mode"), b.get("value"), b.get("epoch"), b.get("checkpoint")]
                       for m, b in by_monitor.items()])]
    return out


def curves(summary: Mapping[str, Any], run_dir: str, plot_link: str) -> list[str]:
    """The history as a table; the plot linked (``plot_link``: its path from the card)."""
    history = summary.get("history") or []
    out = ["", "## Curves", ""]
    if storage.exists(storage.join(run_dir, PLOT_FILE)):
        out += [f"![training curves]({plot_link})", ""]
    columns: list[str] = []
    for record in history:
        columns += [k for k in numeric(record) if k.startswith(("train_", "val_", "lr"))
                    and k not in columns]
    keys = [k for k in RECORD_KEYS if any(r.get(k) is not None for r in history)]
    out.append(table([*keys, *columns, "is_best"],
                     [[r.get(k) for k in (*keys, *columns)] + [bool(r.get("is_best"))]
                      for r in history]) if history else "no evaluation recorded")
    return out


def provenance_section(summary: Mapping[str, Any]) -> list[str]:
    prov = summary.get("provenance")
    out = ["", "## Provenance", ""]
    if not prov:
        return [*out, "not recorded"]
    code, packages, data = prov.get("code") or {}, prov.get("packages") or {}, prov.get("data")
    out.append(table(["code", "value"], [[k, v] for k, v in code.items()]))
    out += ["", table(["package", "version"], [[k, v] for k, v in packages.items()]), ""]
    rows = []
    for split, fp in (data or {}).items():
        detail = (f"{len(fp.get('files') or [])} files, rows {number(fp.get('rows'))}"
                  if fp.get("kind") == "ray_dataset" else f"length {number(fp.get('length'))}")
        rows.append([split, fp.get("kind"), detail, fp.get("sha256"),
                     fp.get("reason") or fp.get("note") or ""])
    out.append(table(["split", "kind", "size", "sha256 of the sample", "note"], rows)
               if rows else "data: not fingerprinted")
    changes = summary.get("provenance_changes") or []
    if changes:
        out += ["", "Changed on a resume:", "",
                table(["after epoch", "what", "before", "after"],
                      [[c.get("epoch"), c.get("what"), c.get("before"), c.get("after")]
                       for c in changes])]
    return out


def exports(run_dir: str) -> list[str]:
    """``orchestrator export``'s checks (``export/*.json``), where it ran."""
    folder = storage.join(run_dir, EXPORT_DIR)
    try:
        names = sorted(n for n in storage.list_files(folder) if n.endswith(".json"))
    except OSError:
        names = []
    rows = []
    for name in names:
        try:
            check = storage.read_json(storage.join(folder, name))
        except (OSError, ValueError):
            continue
        if isinstance(check, dict) and "format" in check:
            rows.append([check.get("format"), f"{EXPORT_DIR}/{check.get('file')}",
                         check.get("max_abs_diff"), check.get("tolerance")])
    if not rows:
        return []
    return ["", "## Exports (checked against the saved weights)", "",
            table(["format", "file", "max_abs_diff", "tolerance"], rows)]


def how_to_load(summary: Mapping[str, Any], load_from: str, checkpoint: str | None) -> list[str]:
    cfg = summary.get("config") or {}
    workload = cfg.get("workload") or {}
    module, _, function = str(workload.get("entrypoint", "module:build")).partition(":")
    params = json.dumps(workload.get("params") or {})
    out = ["", "## How to load it", "", "With this project:", "", "```python",
           "from orchestrator import load_best", "",
           f"best = load_best({load_from!r})  # the model on CPU, its metadata",
           "model = best.model", "```", ""]
    if checkpoint:
        out += ["Without it (safetensors and the workload's own code):", "", "```python",
                "import json",
                "from safetensors.torch import load_file",
                f"from {module} import {function}", "",
                f"model = {function}(**json.loads({params!r})).model",
                f"model.load_state_dict(load_file({storage.join(checkpoint, MODEL_FILE)!r}))",
                "model.eval()", "```"]
    return out


def card_text(summary: Mapping[str, Any], run_dir: str, *, title: str | None = None,
              load_from: str | None = None, checkpoint: str | None = None,
              extra: Sequence[str] = (), card_dir: str | None = None,
              plot_link: str = PLOT_FILE) -> str:
    """A run's card from its summary (``checkpoint``: the best model's directory, default
    the summary's; ``load_from``: what ``load_best`` is given, and ``card_dir``: where the
    card and ``export/`` are, both default ``run_dir``)."""
    import yaml

    name = title or str(summary.get("name"))
    checkpoint = checkpoint or summary.get("best_checkpoint")
    parts = [front_matter(name, summary), f"# {name}", "",
             "A PyTorch model trained data-parallel on Ray Train by "
             "ray-best-model-orchestrator; this card is written from the run's "
             f"`{SUMMARY_FILE}` (every number as recorded there).", "",
             f"- best model: `{checkpoint}`" if checkpoint else
             "- best model: not kept by this checkpoint policy", "",
             "## What was monitored, and why this evaluation won", "", *why_it_won(summary),
             "", *best_section(summary), *more_bests(summary), *extra,
             *curves(summary, run_dir, plot_link), "", "## Config", "", "```yaml",
             yaml.safe_dump(redacted(summary.get("config") or {}), sort_keys=False).rstrip(),
             "```", *provenance_section(summary), *exports(card_dir or run_dir),
             *how_to_load(summary, load_from or run_dir, checkpoint)]
    return "\n".join(parts) + "\n"


def search_card_text(board: Mapping[str, Any], experiment_dir: str) -> str:
    """A search's card: the best trial's (its summary's numbers) for the exported model, and
    the leaderboard's first ``TOP_ROWS`` rows."""
    trials = board.get("trials") or []
    monitor = board.get("monitor")
    rows = [[r.get("rank"), r.get("trial_id"), r.get("status"), r.get("best_epoch"),
             r.get(f"best_{monitor}"), json.dumps(r.get("hyperparameters"), sort_keys=True)]
            for r in trials[:TOP_ROWS]]
    extra = ["", f"## The search: leaderboard (top {min(TOP_ROWS, len(trials))} of "
             f"{len(trials)} trials, by `{monitor}`, {board.get('mode')})", "",
             table(["rank", "trial_id", "status", "best_epoch", f"best_{monitor}",
                    "hyperparameters"], rows)]
    best_dir = board.get("best_model")
    if not trials or not best_dir:
        summary: dict[str, Any] = {"name": board.get("name"), "monitor": monitor,
                                   "mode": board.get("mode"), "history": []}
        return card_text(summary, experiment_dir, extra=extra)
    trial_id = str(trials[0]["trial_id"])
    summary = storage.read_json(storage.join(experiment_dir, TRIALS_DIR, trial_id, SUMMARY_FILE))
    extra = ["", f"The exported best model (`{BEST_DIR}/`) is trial "
             f"`{trials[0]['trial_id']}`'s, with hyperparameters "
             f"`{json.dumps(trials[0].get('hyperparameters'), sort_keys=True)}`; the sections "
             f"below are that trial's `{SUMMARY_FILE}`.", *extra]
    return card_text(summary, storage.join(experiment_dir, TRIALS_DIR, trial_id),
                     title=str(board.get("name")), load_from=experiment_dir,
                     checkpoint=best_dir, extra=extra, card_dir=experiment_dir,
                     plot_link=f"{TRIALS_DIR}/{trial_id}/{PLOT_FILE}")


def write_card_for(summary: Mapping[str, Any], run_dir: str) -> str:
    """``model_card.md`` from a summary not yet written (the end of a run); its path."""
    path = storage.join(run_dir, CARD_FILE)
    storage.write_bytes(path, card_text(summary, run_dir).encode())
    return path


def write_card(run_dir: str) -> str:
    """(Re)write ``model_card.md`` for an existing run (``summary.json``) or search
    (``leaderboard.json``); returns its path. Anything else: ``UserError`` (one line)."""
    root = storage.resolve(run_dir)
    for name in (LEADERBOARD_FILE, SUMMARY_FILE):
        path = storage.join(root, name)
        if not storage.exists(path):
            continue
        try:
            record = storage.read_json(path)
            text = (search_card_text(record, root) if name == LEADERBOARD_FILE
                    else card_text(record, root))
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            raise UserError(f"{path}: not the record this tool writes ({type(exc).__name__}: "
                            f"{exc}); a finished run's or search's directory is needed") from None
        out = storage.join(root, CARD_FILE)
        storage.write_bytes(out, text.encode())
        return out
    raise UserError(f"{run_dir}: no {SUMMARY_FILE} or {LEADERBOARD_FILE} here; pass a finished "
                    "run's or search's directory")
