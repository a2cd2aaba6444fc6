"""A directory knows what it holds: `train` never runs inside a search's directory, nor `tune`
inside a run's, with or without --resume. Through the real CLI in a subprocess: exit code 2,
one line naming both kinds and the way out, no traceback, Ray never imported, nothing written
(the earlier directory byte for byte as it was). --overwrite replaces either kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from orchestrator.start.run_dir import held_kind, mark, prepare_run_dir
from tests.unit.cli_cases import run_in_one_process
from workers.contract.names import (
    HISTORY_FILE,
    LEADERBOARD_FILE,
    RUN_MARKER,
    SEARCH_FILE,
    SUMMARY_FILE,
)

REPO = Path(__file__).resolve().parents[2]
# Importing Ray at all is a failure here: the refusal comes before Ray starts.
RAY_GUARD = "raise ImportError('ray was imported before the run directory was decided')\n"


def a_run(path: Path, *, marker: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / HISTORY_FILE).write_text('{"history": []}')
    (path / SUMMARY_FILE).write_text('{"status": "completed"}')
    if marker:
        mark(str(path), "run")
    return path


def a_search(path: Path, *, marker: bool = True) -> Path:
    (path / "trials" / "trial-000").mkdir(parents=True)
    (path / SEARCH_FILE).write_text('{"trials": [], "config": {}}')
    (path / LEADERBOARD_FILE).write_text('{"trials": []}')
    (path / "trials" / "trial-000" / SUMMARY_FILE).write_text('{"status": "completed"}')
    if marker:
        mark(str(path), "search")
    return path


def without_kind(path: Path) -> Path:
    """A marker as written before it said what the directory holds."""
    (path / RUN_MARKER).write_text(json.dumps({"created_by": "orchestrator"}))
    return path


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_the_kind_comes_from_the_marker_else_from_the_records(tmp_path: Path) -> None:
    assert held_kind(str(a_run(tmp_path / "r"))) == "run"
    assert held_kind(str(a_search(tmp_path / "s"))) == "search"
    assert held_kind(str(without_kind(a_run(tmp_path / "old-r")))) == "run"
    assert held_kind(str(without_kind(a_search(tmp_path / "old-s")))) == "search"
    assert held_kind(str(a_search(tmp_path / "bare", marker=False))) == "search"
    (tmp_path / "empty").mkdir()
    assert held_kind(str(tmp_path / "empty")) is None


def test_overwrite_replaces_either_kind_and_the_same_kind_resumes(tmp_path: Path) -> None:
    run, search = a_run(tmp_path / "r"), a_search(tmp_path / "s")
    assert prepare_run_dir(str(search), resume=False, overwrite=True, kind="run") == "overwrite"
    assert prepare_run_dir(str(run), resume=False, overwrite=True, kind="search") == "overwrite"
    assert prepare_run_dir(str(run), resume=True, overwrite=False, kind="run") == "resume"
    assert prepare_run_dir(str(search), resume=True, overwrite=False,
                           kind="search") == "resume"


# (command, what the directory holds, how it was marked, extra arguments)
CASES = [
    ("train", "search", "marker", []),
    ("train", "search", "marker", ["--resume"]),
    ("train", "search", "records", ["--resume"]),
    ("tune", "run", "marker", []),
    ("tune", "run", "marker", ["--resume"]),
    ("tune", "run", "records", ["--resume"]),
]


def case_name(command: str, held: str, marked: str, extra: list[str]) -> str:
    return f"{command}-{held}-{marked}-{len(extra)}"


def prepare(root: Path, command: str, held: str, marked: str, extra: list[str]):
    """A directory holding the other kind and a config naming it: (cwd, run dir, files)."""
    cwd = root / case_name(command, held, marked, extra)
    run_dir = (a_run if held == "run" else a_search)(cwd / "runs" / "x")
    if marked == "records":
        without_kind(run_dir)
    before = files(run_dir)
    config = {"name": "x", "storage_path": str(cwd / "runs"),
              "workload": {"entrypoint": "tests.workloads.mistakes:build",
                           "params": {"mistake": "none"}},
              "wandb": {"mode": "disabled"},
              "tune": {"search_space": {"train.lr": {"choice": [0.01, 0.02]}}}}
    (cwd / "cfg.yaml").write_text(yaml.safe_dump(config))
    return cwd, run_dir, before


def guarded_env(root: Path) -> dict[str, str]:
    guard = root / "_guard"
    if not guard.exists():
        (guard / "ray").mkdir(parents=True)
        (guard / "ray" / "__init__.py").write_text(RAY_GUARD)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(guard), str(REPO)])
    return env


# The one case that also runs as ``python -m orchestrator`` in a process of its own; the
# others run one after another in one process (tests/unit/cli_cases.py), which the last test
# here holds to the same output.
OWN_PROCESS = CASES[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory):
    """Each case's (process result, run dir, files before), and ``own``: OWN_PROCESS's in a
    process of its own."""
    root = tmp_path_factory.mktemp("kinds")
    env = guarded_env(root)
    prepared = [prepare(root, *case) for case in CASES]
    own_cwd, own_dir, own_before = prepare(root / "own", *OWN_PROCESS)
    with ThreadPoolExecutor(1) as pool:  # beside the shared process
        own = pool.submit(subprocess.run, [sys.executable, "-m", "orchestrator",
                                           OWN_PROCESS[0], "cfg.yaml", *OWN_PROCESS[3]],
                          cwd=own_cwd, env=env, capture_output=True, text=True, timeout=120)
        outputs = run_in_one_process(
            [{"id": case_name(*case), "cwd": str(cwd), "argv": [case[0], "cfg.yaml", *case[3]]}
             for case, (cwd, _, _) in zip(CASES, prepared, strict=True)], str(root), env)
        own_proc = own.result()
    procs = [subprocess.CompletedProcess([], **outputs[case_name(*case)]) for case in CASES]
    return ([(proc, run_dir, before) for proc, (_, run_dir, before) in zip(procs, prepared,
                                                                           strict=True)],
            (own_proc, own_dir, own_before))


def test_the_shared_process_prints_what_a_process_of_its_own_prints(results) -> None:
    shared, _, _ = results[0][CASES.index(OWN_PROCESS)]
    own, own_dir, before = results[1]
    assert own.returncode == shared.returncode == 2, own.stderr[-3000:]
    assert (own.stdout, own.stderr) == (shared.stdout, shared.stderr.replace(
        str(own_dir).replace("/own/", "/"), str(own_dir)))
    assert files(own_dir) == before


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"{c}-on-{h}-{m}{''.join(e)}" for c, h, m, e in CASES])
def test_a_directory_of_the_other_kind_is_refused_in_one_line(results, index: int) -> None:
    command, held, _, _ = CASES[index]
    proc, run_dir, before = results[0][index]
    wanted = "search" if command == "tune" else "run"
    made_by = "tune" if held == "search" else "train"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == ""
    assert proc.stderr == (
        f"error: {run_dir} holds a {held} (made by `orchestrator {made_by}`), not a {wanted}: "
        f"`orchestrator {command}` does not continue it or write into it; choose another "
        "name (--set name=...), or pass --overwrite to replace it\n")
    assert files(run_dir) == before  # byte for byte: nothing written, nothing removed
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["x"]  # nothing beside it
