"""The per-worker training loops, one per ``engine`` (imported lazily: fastai is heavy).

All start with ``workers.loop.runtime.start_worker`` and end every evaluation with the
worker's ``workers.checkpoint.manager.CheckpointManager`` (``Worker.checkpoint_manager``);
they differ only in who runs the epochs: the project, fastai, or the workload's own loop.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

ENGINES = {
    "torch": "workers.engines.torch_engine:train_loop",
    "fastai": "workers.engines.fastai.engine:train_loop",
    "loop": "workers.engines.loop_engine:train_loop",
}


def train_loop_for(engine: str) -> Callable[[dict[str, Any]], None]:
    module, _, name = ENGINES[engine].partition(":")
    return getattr(importlib.import_module(module), name)
