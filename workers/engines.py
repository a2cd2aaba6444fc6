"""Which per-worker training loop runs for ``engine`` (imported lazily: fastai is heavy)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

ENGINES = {
    "torch": "workers.loop:train_loop",
    "fastai": "workers.fastai_engine:train_loop",
}


def train_loop_for(engine: str) -> Callable[[dict[str, Any]], None]:
    module, _, name = ENGINES[engine].partition(":")
    return getattr(importlib.import_module(module), name)
