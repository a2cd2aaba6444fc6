"""Runs ``orchestrator``'s CLI on many prepared cases in ONE interpreter, as
``python -m orchestrator`` would on each: ``python tests/unit/cli_cases.py CASES OUT``.

CASES is a JSON list of ``{"id", "cwd", "argv", "env"}`` (``env``: variables set for that case
alone); OUT receives ``{id: {"returncode",
"stdout", "stderr"}}``. For each case the process moves into the case's directory, puts it
first on ``sys.path`` (where ``python -m`` puts the working directory), calls
``orchestrator.cli.main.main(argv)`` with stdout and stderr captured, and afterwards forgets
the modules the case's directory provided. An exception that escapes ``main`` is recorded as
its traceback on stderr with exit code 1, as the interpreter would print it.

Why: the bad-input tests (``tests/unit/test_config.py``) are about a hundred CLI calls that each
start Python and import torch, pydantic and pyarrow (0.3-1.8 s a call here); in one process
they share that start. A few of the same cases still run as their own ``python -m
orchestrator`` processes, and the test compares the two.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys
import traceback
import warnings


def run_case(argv: list[str], cwd: str, env: dict[str, str]) -> dict[str, object]:
    from orchestrator.cli.main import main

    saved_env = dict(os.environ)
    os.environ.update(env)
    os.chdir(cwd)
    sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    modules_before = set(sys.modules)
    out, err = io.StringIO(), io.StringIO()
    try:
        # catch_warnings: a warning shown by an earlier case is shown again, as in a process
        # of its own.
        with (warnings.catch_warnings(), contextlib.redirect_stdout(out),
              contextlib.redirect_stderr(err)):
            try:
                code: object = main(argv)
            except SystemExit as exc:  # argparse's refusals
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - printed as the interpreter would print it
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path.remove(cwd)
        for name in set(sys.modules) - modules_before:
            module_file = getattr(sys.modules[name], "__file__", None) or ""
            if module_file.startswith(cwd):
                del sys.modules[name]
    return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def run(cases_file: str, out_file: str) -> None:
    with open(cases_file) as f:
        cases = json.load(f)
    results = {case["id"]: run_case(case["argv"], case["cwd"], case.get("env", {}))
               for case in cases}
    with open(out_file, "w") as f:
        json.dump(results, f)


def run_in_one_process(cases: list[dict[str, object]], workdir: str,
                       env: dict[str, str]) -> dict[str, dict[str, object]]:
    """The cases (as in CASES above) run by this file in one new process with ``env``;
    their results by id. ``workdir`` receives the two JSON files."""
    import subprocess

    cases_file, out_file = os.path.join(workdir, "cases.json"), os.path.join(workdir,
                                                                            "results.json")
    with open(cases_file, "w") as f:
        json.dump(cases, f)
    proc = subprocess.run([sys.executable, __file__, cases_file, out_file], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(out_file) as f:
        results: dict[str, dict[str, object]] = json.load(f)
    return results


if __name__ == "__main__":
    del sys.path[0]  # this file's folder: a case finds what ``python -m`` would find
    run(sys.argv[1], sys.argv[2])
