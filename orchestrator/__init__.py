"""Data-parallel PyTorch training on Ray that keeps, and documents, the best model.

``from orchestrator import train, tune, load_best, export, predict``: see
``orchestrator.api``. Loaded on first use, so that ``orchestrator --help`` and
``orchestrator best`` stay fast.
"""

from typing import Any

__all__ = ["BestModel", "RunSummary", "SearchResult", "export", "load_best", "predict", "train",
           "tune"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from orchestrator import api

        return getattr(api, name)
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
