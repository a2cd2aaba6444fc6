"""Install and check the project on every Python that pyproject.toml's requires-python admits.

For each version: a fresh venv under .venvs/py3.X, the project installed into it (editable,
except one version that gets a plain, non-editable ``pip install .``), the unit tier, then one
short 2-worker training run of the built-in ``digits`` config from a directory outside the
repository, whose best model must be saved, verified by ``orchestrator best`` and re-scored
from its weights. Prints one table; exits 1 if any version fails.

    python scripts/test_pythons.py                 # every supported version found here
    TEST_PYTHONS=3.10,3.12 python scripts/test_pythons.py
    TEST_PYTHONS=/opt/py/bin/python3.12 python scripts/test_pythons.py

Interpreters: TEST_PYTHONS (versions or interpreter paths, comma-separated) if set, else the
newest patch release of each supported 3.X under ~/.pyenv/versions (or $PYENV_ROOT), else
``python3.X`` on PATH. TEST_PYTHONS_WHEEL names the version that gets the non-editable install
(default 3.11 when tested, else the first). Extra pip arguments (say ``--find-links DIR`` of
wheels downloaded once) go in TEST_PYTHONS_PIP_ARGS. Run with the standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENVS = REPO / ".venvs"

# Re-scores the saved best model in the venv, outside the repository: the installed package's
# own loader and evaluation, as tests/integration/test_cli.py does in one plain process.
RESCORE = """
import json, sys, torch
from workers.checkpoint.load import load_weights
from workers.loop.metric_setup import workload_metrics
from workers.loop.scoring import evaluate_dataset
from workers.workloads.digits import build
summary = json.load(open(sys.argv[1]))
workload = build(**summary["config"]["workload"]["params"])
workload.model.load_state_dict(load_weights(summary["best_checkpoint"]))
got = evaluate_dataset(workload.model, workload.val_dataset, workload.loss_fn,
                       workload_metrics(workload, 10), split="val", batch_size=256,
                       device=torch.device("cpu"))
want = summary["best_metrics"]
bad = {k: (v, want[k]) for k, v in got.items() if abs(v - want[k]) > 1e-6 * max(1, abs(v))}
print("re-scored", got, "mismatch" if bad else "matches best_metrics", bad or "")
sys.exit(1 if bad else 0)
"""


@dataclass
class Result:
    version: str
    python: Path
    editable: bool
    full_version: str = "?"
    install_s: float | None = None
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    unit_ok: bool = False
    train_ok: bool = False
    total_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.unit_ok and self.train_ok


def supported_minors() -> list[str]:
    """3.X versions admitted by requires-python (read with a regex: no tomllib on 3.10)."""
    text = (REPO / "pyproject.toml").read_text()
    spec = re.search(r'^requires-python\s*=\s*"([^"]+)"', text, re.M).group(1)
    lo = re.search(r">=\s*3\.(\d+)", spec)
    hi = re.search(r"<\s*3\.(\d+)", spec)
    if not lo or not hi:
        sys.exit(f"requires-python {spec!r}: expected the form '>=3.A,<3.B'")
    return [f"3.{m}" for m in range(int(lo.group(1)), int(hi.group(1)))]


def version_of(python: str | Path) -> str | None:
    try:
        out = subprocess.run([str(python), "-c", "import sys; print(*sys.version_info[:3])"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return ".".join(out.stdout.split()) if out.returncode == 0 else None


def find_python(minor: str) -> Path | None:
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    patches = sorted(root.glob(f"{minor}.*/bin/python{minor}"),
                     key=lambda p: [int(x) for x in re.findall(r"\d+", p.parts[-3])])
    candidates = [*reversed(patches)]
    on_path = shutil.which(f"python{minor}")
    if on_path:
        candidates.append(Path(on_path))
    for python in candidates:
        found = version_of(python)
        if found and found.rsplit(".", 1)[0] == minor:
            return python
    return None


def interpreters() -> list[tuple[str, Path]]:
    wanted = os.environ.get("TEST_PYTHONS", "")
    items = [w.strip() for w in wanted.split(",") if w.strip()] or supported_minors()
    found = []
    for item in items:
        if re.fullmatch(r"3\.\d+", item):
            python = find_python(item)
            if python is None:
                sys.exit(f"Python {item}: no interpreter found (pyenv versions, python{item} "
                         "on PATH); set TEST_PYTHONS to interpreter paths")
        else:
            python = Path(item)
        full = version_of(python)
        if full is None:
            sys.exit(f"{python}: does not run")
        found.append((full.rsplit(".", 1)[0], python))
    return found


def run(cmd: list[str], log: Path, **kw) -> subprocess.CompletedProcess:
    """Run with output to LOG (appended); the command line heads its part of the log."""
    with log.open("a") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n")
        out.flush()
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, **kw)


def install(result: Result, venv: Path, log: Path) -> bool:
    if venv.exists():
        shutil.rmtree(venv)
    start = time.monotonic()
    if run([str(result.python), "-m", "venv", str(venv)], log).returncode:
        return False
    target = ".[test]" if not result.editable else "-e.[test]"
    if not result.editable:  # setuptools builds in build/ and would ship a stale file from it
        shutil.rmtree(REPO / "build", ignore_errors=True)
    extra = shlex.split(os.environ.get("TEST_PYTHONS_PIP_ARGS", ""))
    proc = run([str(venv / "bin/python"), "-m", "pip", "install", "--quiet", target, *extra],
               log, cwd=REPO)
    result.install_s = time.monotonic() - start
    result.full_version = version_of(venv / "bin/python") or "?"
    return proc.returncode == 0


def unit_tests(result: Result, venv: Path, log: Path) -> None:
    with log.open("a") as out:
        out.write("\n$ python -m pytest -q -p no:cacheprovider tests/unit\n")
    proc = subprocess.run([str(venv / "bin/python"), "-m", "pytest", "-q", "-p",
                           "no:cacheprovider", "tests/unit"], cwd=REPO, capture_output=True,
                          text=True)
    with log.open("a") as out:
        out.write(proc.stdout + proc.stderr)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)",
                                                      tail[0]))
    result.passed = counts.get("passed", 0)
    result.failed = counts.get("failed", 0) + counts.get("error", 0)
    result.skipped = counts.get("skipped", 0)
    result.unit_ok = proc.returncode == 0 and result.passed > 0
    if not result.unit_ok:
        result.notes.append(f"unit tier: {tail[0] or f'exit {proc.returncode}'}")


def check_wheel_install(result: Result, venv: Path, work: Path, log: Path) -> bool:
    """A plain install runs from site-packages, with the built-in configs as real files."""
    probe = ("import orchestrator, pathlib; from orchestrator.start.config_file import "
             "builtin_configs; c = builtin_configs(); "
             "print(orchestrator.__file__); print(*(f'{n}={p}' for n, p in c.items()));"
             "assert c and all(p.is_file() and not p.is_symlink() for p in c.values())")
    proc = subprocess.run([str(venv / "bin/python"), "-c", probe], cwd=work,
                          capture_output=True, text=True)
    with log.open("a") as out:
        out.write(f"\n$ (non-editable install check)\n{proc.stdout}{proc.stderr}")
    where = Path(proc.stdout.splitlines()[0]) if proc.stdout else REPO
    if proc.returncode:
        result.notes.append("non-editable install: built-in configs missing or links (see log)")
    elif venv not in where.parents:  # an editable install would import the repository's
        result.notes.append(f"non-editable install: orchestrator imported from {where}")
    return not result.notes


def training_run(result: Result, venv: Path, log: Path) -> None:
    """Two epochs of the built-in digits config on 2 workers, run from outside the repo."""
    with tempfile.TemporaryDirectory(prefix=f"test-py{result.version}-") as tmp:
        work = Path(tmp)
        home = work / "home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RAY_"))}
        env.update(HOME=str(home), RAY_AUTH_TOKEN=secrets.token_hex(32),
                   RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1", WANDB_DIR=str(work / "wb"),
                   WANDB_DATA_DIR=str(work / "wb"), WANDB_CACHE_DIR=str(work / "wb"),
                   WANDB_CONFIG_DIR=str(work / "wb"))
        env.pop("PYTHONPATH", None)
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        if not result.editable and not check_wheel_install(result, venv, work, log):
            return
        py = str(venv / "bin/python")
        runs = work / "runs"
        proc = run([py, "-m", "orchestrator", "train", "digits", "--set", "train.epochs=2",
                    "--set", f"storage_path={runs}", "--set", "wandb.mode=offline"],
                   log, cwd=work, env=env, timeout=900)
        run_dir = runs / "digits-mlp"
        summary_file = run_dir / "summary.json"
        if proc.returncode or not summary_file.exists():
            result.notes.append(f"training run: exit {proc.returncode} (see log)")
            return
        summary = json.loads(summary_file.read_text())
        best = summary.get("best_checkpoint")
        problems = [msg for bad, msg in [
            (summary.get("epochs_completed") != 2, "not 2 epochs"),
            (not best or not (Path(best) / "model.safetensors").is_file(),
             "no best_checkpoint/model.safetensors"),
            (summary.get("test_metrics") is None, "test_metrics is null"),
        ] if bad]
        shown = subprocess.run([py, "-m", "orchestrator", "best", str(run_dir), "--json"],
                               cwd=work, env=env, capture_output=True, text=True)
        if shown.returncode or json.loads(shown.stdout or "null") != summary:
            problems.append(f"`orchestrator best --json` exit {shown.returncode}")
        if not problems and run([py, "-c", RESCORE, str(summary_file)], log, cwd=work,
                                env=env).returncode:
            problems.append("re-scored best model differs from best_metrics")
        if problems:
            result.notes.append("training run: " + "; ".join(problems))
            return
        result.train_ok = True
        with log.open("a") as out:
            out.write(f"\nbest epoch {summary['best_epoch']}, val {summary['best_metrics']}, "
                      f"test {summary['test_metrics']}\n")


def check(version: str, python: Path, editable: bool, keep: bool) -> Result:
    result = Result(version, python, editable)
    venv = VENVS / f"py{version}"
    log = VENVS / f"py{version}.log"
    log.write_text(f"{python} ({'editable' if editable else 'non-editable'} install)\n")
    start = time.monotonic()
    print(f"== Python {version} ({python}): installing ({'-e ' if editable else ''}.[test]), "
          f"log in {log.relative_to(REPO)}", flush=True)
    if install(result, venv, log):
        print(f"   installed in {result.install_s:.0f} s; unit tier...", flush=True)
        unit_tests(result, venv, log)
        print(f"   unit tier: {result.passed} passed, {result.failed} failed; training...",
              flush=True)
        try:
            training_run(result, venv, log)
        except subprocess.TimeoutExpired as exc:
            result.notes.append(f"training run: no result after {exc.timeout:.0f} s")
    else:
        result.notes.append("install failed (see log)")
    result.total_s = time.monotonic() - start
    print(f"   {'ok' if result.ok else 'FAILED'} in {result.total_s:.0f} s "
          f"{' '.join(result.notes)}", flush=True)
    if not keep:
        shutil.rmtree(venv, ignore_errors=True)
    return result


def minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def table(results: list[Result]) -> None:
    headers = ["Python", "install", "install time", "unit passed", "unit failed", "skipped",
               "training run", "total time"]
    rows = [[r.full_version, "editable" if r.editable else "wheel (pip install .)",
             minutes(r.install_s), str(r.passed), str(r.failed), str(r.skipped),
             "ok" if r.train_ok else "FAILED", minutes(r.total_s)] for r in results]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the script runs on any Python, without the project installed
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
        for row in [headers, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    else:
        t = Table(title="make test-pythons")
        for h in headers:
            t.add_column(h)
        for row in rows:
            t.add_row(*row)
        Console(width=120).print(t)
    for r in results:
        for note in r.notes:
            print(f"Python {r.version}: {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true",
                        help="keep each .venvs/py3.X (about 7 GB each) after its checks")
    args = parser.parse_args()
    found = interpreters()
    wheel = os.environ.get("TEST_PYTHONS_WHEEL") or (
        "3.11" if any(v == "3.11" for v, _ in found) else found[0][0])
    VENVS.mkdir(exist_ok=True)
    results = [check(v, py, editable=(v != wheel), keep=args.keep) for v, py in found]
    table(results)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
