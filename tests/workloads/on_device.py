"""The overfitting test workload (``tests.workloads.overfit``), whose model notes where it
really runs, and can hold still to be killed from outside.

- The first training forward and the first evaluation forward in each process write
  ``<out_dir>/<train|eval>-<pid>.json``: the parameters' device, the batch's device, whether
  autocast is on and in which dtype, the process group's backend, the rank and the pid.
- ``hold_at_step``: at that training step (counted in this process) the model writes its
  pid into ``marker`` and waits there to be SIGKILLed (once: not if ``marker`` exists). A
  test kills exactly that process, as a fault from outside the workload would.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests.workloads import overfit

HOLD_S = 120  # then fail loudly: the test never killed the process


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # whole, or not there: the test polls for it


class Probe(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, out_dir: str, hold_at_step: int | None,
                 marker: str | None) -> None:
        super().__init__()
        self.inner = inner
        self.out_dir = Path(out_dir)
        self.hold_at_step = hold_at_step
        self.marker = Path(marker) if marker else None
        self.steps = 0
        self._noted: set[str] = set()

    def _facts(self, x: torch.Tensor) -> dict[str, Any]:
        kind = x.device.type
        return {"pid": os.getpid(), "training": self.training,
                "param_device": str(next(self.parameters()).device),
                "batch_device": str(x.device),
                "autocast": torch.is_autocast_enabled(kind),
                "autocast_dtype": str(torch.get_autocast_dtype(kind)),
                "backend": dist.get_backend() if dist.is_initialized() else None,
                "rank": dist.get_rank() if dist.is_initialized() else None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = "train" if self.training else "eval"
        if kind not in self._noted:
            self._noted.add(kind)
            _write(self.out_dir / f"{kind}-{os.getpid()}.json", json.dumps(self._facts(x)))
        if self.training:
            self.steps += 1
            if self.steps == self.hold_at_step and not self.marker.exists():
                _write(self.marker, str(os.getpid()))
                time.sleep(HOLD_S)
                raise RuntimeError(f"held {HOLD_S} s at step {self.steps} and was not killed "
                                   "(tests/workloads/on_device.py)")
        return self.inner(x)


def build(out_dir: str, hold_at_step: int | None = None, marker: str | None = None,
          **overfit_params: Any):
    workload = overfit.build(**overfit_params)
    workload.model = Probe(workload.model, out_dir, hold_at_step, marker)
    return workload


def notes(out_dir: str | Path, kind: str) -> list[dict[str, Any]]:
    """What the model noted, of one kind (``train`` or ``eval``), oldest first."""
    found = [json.loads(p.read_text()) for p in Path(out_dir).glob(f"{kind}-*.json")]
    return sorted(found, key=lambda n: Path(out_dir, f"{kind}-{n['pid']}.json").stat().st_mtime)
