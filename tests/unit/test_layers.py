"""The layers hold: no module imports from a layer above its own.

Every ``.py`` under ``orchestrator/`` and ``workers/`` is parsed (never imported) and every
import it makes is checked: at the top, inside functions, under ``TYPE_CHECKING``, and
``importlib.import_module("...")`` with a literal name. A module may import its own layer and
the layers below it; a lower layer reaching up is named with its file, line, the module it
imports and both layers.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("orchestrator", "workers")

# Bottom to top. A module belongs to the layer of its longest matching prefix (whole dotted
# parts: ``workers.loop`` holds ``workers.loop.runtime``, not ``workers.loopy``); modules
# that do not exist yet are fine, the table maps by prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # What every layer stands on: the config schema, the contract's names and records, the
    # workload protocol and its loading (no engine: a fastai Learner is recognised, not
    # wrapped); the one safe write; the register of private Ray/W&B/fastai/torchmetrics APIs.
    ("contract", ("workers.contract", "workers.files", "workers.compat")),
    # The built-in workloads: plain user code on the contract and libraries only (the
    # project reaches them by entrypoint string; see the test that nothing imports them).
    ("workloads", ("workers.workloads",)),
    # Pure decisions: no I/O, no collectives (``FORBIDDEN`` below), unit-tested directly.
    ("decisions", ("workers.decisions",)),
    # Metric maths from sufficient statistics and the few collectives every rank makes.
    ("evaluation", ("workers.evaluation",)),
    # Checkpoints on a worker: when and what to save, snapshot, write, load back; handed the
    # model's state by the loop, never reaching into it.
    ("checkpoint", ("workers.checkpoint",)),
    # What every engine shares: start a worker, devices, loaders, train and evaluate steps,
    # sharding, Ray Dataset splits, the channel, the probe, a saved model scored.
    ("loop", ("workers.loop",)),
    # One train-loop per ``engine`` (torch, fastai, the workload's own loop), on the loop;
    # ``fastai_callbacks`` is the public path of the fastai engine's drop-in callbacks.
    ("engines", ("workers.engines", "workers.fastai_callbacks")),
    # The driver and the Ray Train controller: may import any of ``workers``; no worker
    # module ever imports it.
    ("orchestrator", ("orchestrator",)),
]
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}

# Libraries a layer must not import, beyond the layer rule (a prefix of dotted parts).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "decisions": ("torch.distributed", "ray", "wandb", "fastai"),
}

# Package roots: only a docstring or lazy re-exports; checked as the bottom of their tree.
ROOT_LAYER = {"workers": "contract", "orchestrator": "orchestrator"}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository
    line: int
    module: str  # the dotted module imported


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> str | None:
    """The layer of the longest prefix that holds ``module``; None for libraries."""
    best: tuple[int, str] | None = None
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if within(module, prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), name)
    if best is None:
        return ROOT_LAYER.get(module)
    return best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(node: ast.ImportFrom, package: str) -> str:
    """``from ..x import y`` as an absolute module name, from the importing package."""
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def is_our_module(module: str) -> bool:
    path = REPO.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_in(source: str, file: str, module: str, is_package: bool) -> list[Import]:
    """Every import in ``source``, wherever it stands. ``from a import b`` counts as
    ``a.b`` when that is a module of ours (``from workers import files``), else as ``a``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, filename=file)):
        if isinstance(node, ast.Import):
            found += [Import(file, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node, package)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                named = full if is_our_module(full) else base
                found.append(Import(file, node.lineno, named))
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module"
                   or getattr(node.func, "id", None) in ("import_module", "__import__"))):
            found.append(Import(file, node.lineno, node.args[0].value))
    return found


def source_files() -> list[Path]:
    return sorted(p for root in ROOTS for p in (REPO / root).rglob("*.py")
                  if "__pycache__" not in p.parts)


def all_imports() -> list[tuple[str, Import]]:
    """(the importing module, the import) for every import of every source file."""
    out = []
    for path in source_files():
        module = module_name(path)
        rel = str(path.relative_to(REPO))
        out += [(module, imp) for imp in imports_in(path.read_text(), rel, module,
                                                    path.name == "__init__.py")]
    return out


def violations(pairs: list[tuple[str, Import]]) -> list[str]:
    found = []
    for module, imp in pairs:
        own, theirs = layer_of(module), layer_of(imp.module)
        if own is None:
            continue  # a file ``test_every_module_has_a_layer`` names
        if theirs is not None and RANK[theirs] > RANK[own]:
            found.append(f"{imp.file}:{imp.line} imports {imp.module}: layer {own} "
                         f"(#{RANK[own]}) may not import layer {theirs} (#{RANK[theirs]})")
        for library in FORBIDDEN.get(own, ()):
            if within(imp.module, library):
                found.append(f"{imp.file}:{imp.line} imports {imp.module}: layer {own} "
                             f"is pure and may not import {library}")
    return found


def test_no_module_imports_a_layer_above_its_own():
    found = violations(all_imports())
    assert not found, ("lower layers reach up (bottom to top: "
                       f"{' < '.join(RANK)}):\n" + "\n".join(found))


def test_every_module_has_a_layer():
    unplaced = [str(p.relative_to(REPO)) for p in source_files()
                if layer_of(module_name(p)) is None]
    assert not unplaced, f"add these to LAYERS in tests/unit/test_layers.py: {unplaced}"


def test_nothing_imports_the_builtin_workloads():
    """They are user code, reached by ``workload.entrypoint`` strings: importing one would
    make a layer depend on an example."""
    found = [f"{imp.file}:{imp.line} imports {imp.module}" for module, imp in all_imports()
             if layer_of(imp.module) == "workloads" and layer_of(module) != "workloads"]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(("source", "expected"), [
    ("import ray.train", "ray.train"),
    ("def f():\n    from workers.loop.runtime import start_worker", "workers.loop.runtime"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from workers.engines import x",
     "workers.engines"),
    ("from . import runtime", "workers.loop.runtime"),
    ("from ..engines.fastai import learner", "workers.engines.fastai.learner"),
    ("from workers import files", "workers.files"),
    ("import importlib\nimportlib.import_module('workers.engines.torch_engine')",
     "workers.engines.torch_engine"),
])
def test_every_kind_of_import_is_seen(source, expected):
    found = imports_in(source, "workers/loop/x.py", "workers.loop.x", is_package=False)
    assert expected in [imp.module for imp in found]


def test_a_lower_layer_reaching_up_is_named():
    source = "def f():\n    from workers.engines.fastai.learner import learner_workload\n"
    pairs = [("workers.contract.workload", imp) for imp in
             imports_in(source, "workers/contract/workload.py", "workers.contract.workload",
                        is_package=False)]
    assert violations(pairs) == [
        "workers/contract/workload.py:2 imports workers.engines.fastai.learner: layer contract "
        "(#0) may not import layer engines (#6)"]
    pure = imports_in("import torch.distributed as dist", "workers/decisions/t.py",
                      "workers.decisions.t", is_package=False)
    assert violations([("workers.decisions.t", imp) for imp in pure]) == [
        "workers/decisions/t.py:1 imports torch.distributed: layer decisions is pure and may "
        "not import torch.distributed"]
