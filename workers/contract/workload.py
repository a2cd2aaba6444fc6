"""Loading a user's workload: ``build(**params)`` from ``module:function``.

The returned object only needs the attributes below (a ``Workload``, a SimpleNamespace,
anything), or is a mapping with those keys (taken as a SimpleNamespace): plain user code never
has to import this project.
"""

from __future__ import annotations

import importlib
import inspect
import socket
import sys
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import torch

from workers.contract.protocol import Workload, WorkloadError

__all__ = [
    "Workload",
    "WorkloadError",
    "as_workload",
    "call_build",
    "check_params",
    "import_entrypoint",
    "is_fastai_learner",
]


def import_entrypoint(entrypoint: str) -> Callable[..., Any]:
    module_name, _, func_name = entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure in user code is a bad entrypoint
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise WorkloadError(
            f"workload.entrypoint: cannot import module {module_name!r} "
            f"({type(exc).__name__}: {first_line}); it must be importable from the working "
            "directory or PYTHONPATH"
        ) from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise WorkloadError(
            f"workload.entrypoint: module {module_name!r} has no function {func_name!r}"
        )
    return func


def check_params(entrypoint: str, params: dict[str, Any]) -> None:
    """Fail before anything starts if the params do not fit the function's signature."""
    func = import_entrypoint(entrypoint)
    try:
        inspect.signature(func).bind(**params)
    except TypeError as exc:
        raise WorkloadError(f"workload.params: {exc} (for {entrypoint})") from exc
    except ValueError:
        return  # no introspectable signature (a builtin): nothing to check here


# ``loss_fn`` may be absent or None: the model then computes its own loss (``output.loss``).
REQUIRED = ("model", "train_dataset", "val_dataset")


def is_fastai_learner(obj: Any) -> bool:
    """Without importing fastai: a Learner exists only if its module was imported."""
    learner = sys.modules.get("fastai.learner")
    return learner is not None and isinstance(obj, learner.Learner)


def call_build(entrypoint: str, params: dict[str, Any]) -> Any:
    """What ``build(**params)`` returned, as it is (a fastai Learner too: presenting one as a
    workload is the fastai adapter's, above this contract). A ``build`` that raises (a package
    or a file this machine lacks) is the user's to fix: one line naming the entrypoint, never
    retried."""
    build = import_entrypoint(entrypoint)
    try:
        return build(**params)
    except Exception as exc:  # whatever the user's code raised
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise WorkloadError(f"workload.entrypoint: {entrypoint} raised {type(exc).__name__}: "
                            f"{first_line[:200]} (on {socket.gethostname()})") from exc


def as_workload(built: Any, entrypoint: str) -> Any:
    """``built`` checked as a workload: a mapping taken as a SimpleNamespace of its keys, the
    required fields present, the model a ``torch.nn.Module``."""
    workload, kind = built, "an object"
    if isinstance(workload, Mapping):  # {"model": ..., "train_dataset": ...}: its keys
        workload, kind = SimpleNamespace(**{str(k): v for k, v in workload.items()}), "a mapping"
    missing = [name for name in REQUIRED if getattr(workload, name, None) is None]
    if missing:
        raise WorkloadError(
            f"workload.entrypoint: {entrypoint} returned {kind} without "
            f"{', '.join(missing)} (needs {', '.join(REQUIRED)})"
        )
    if not isinstance(workload.model, torch.nn.Module):
        raise WorkloadError(
            f"workload.entrypoint: {entrypoint} returned a model of type "
            f"{type(workload.model).__name__}, expected torch.nn.Module"
        )
    return workload

