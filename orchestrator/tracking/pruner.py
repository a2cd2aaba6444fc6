"""Online runs: superseded model versions deleted through W&B's public API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.results.checkpoints import decided_value
from workers.contract.names import point
from workers.decisions.top_k import TopK


class VersionPruner:
    """Online runs with ``keep`` other than ``all``: once a version is committed, every older
    version of the run's model that is neither the best (the newest improvement) nor, with
    ``best_and_last``, the newest, is deleted through W&B's public API. ``api``: a
    ``wandb.Api`` (made when first needed).

    With ``checkpoint.keep_top_k`` > 1 (``top_k``) the best are the versions of the K best
    evaluations, by the rule the run keeps its checkpoints by (``decisions.top_k``), learned
    from each version's metadata: a version that leaves the K is deleted as Ray deletes its
    checkpoint."""

    def __init__(self, keep: str, api: Any = None, top_k: int = 1) -> None:
        self.keep = keep
        self._api = api
        self.versions: list[tuple[str, bool]] = []  # (qualified name, improvement), oldest first
        self.deleted: list[str] = []
        self.k = top_k
        self.top: TopK | None = None  # made with the first version's mode
        self.at: dict[str, tuple[int, int]] = {}  # each version's place in the run

    def committed(self, artifact: Any, is_best: bool,
                  metadata: Mapping[str, Any] | None = None) -> None:
        artifact.wait()  # its version is known, and it is there before others go
        name = artifact.qualified_name
        if any(v[0] == name for v in self.versions):
            return  # the same files logged again (a moved alias): no new version
        self.versions.append((name, is_best))
        if self.k > 1 and metadata is not None and "top_k_rank" in metadata:
            self._offer(name, metadata)
            kept = {n for n, _ in self.versions if self.at.get(n) in self._top_points()}
            if self.keep != "best":
                kept.add(name)
            self._delete_all_but(kept)
            return
        improvements = [n for n, best in self.versions if best]
        if self.keep == "best" and improvements:
            kept = {improvements[-1]}
        else:  # the newest (the last), and the newest improvement (the best)
            kept = {name, *improvements[-1:]}
        self._delete_all_but(kept)

    def _offer(self, name: str, metadata: Mapping[str, Any]) -> None:
        if self.top is None:
            self.top = TopK(self.k, metadata["mode"])
        at = self.at[name] = point(metadata)
        if at not in self._top_points():  # not a model of the K logged again
            self.top.add(decided_value(metadata), *at)  # type: ignore[arg-type]

    def _top_points(self) -> set[tuple[int, int]]:
        return {(e["epoch"], e["global_step"] or 0) for e in (self.top.entries if self.top
                                                               else [])}

    def _delete_all_but(self, kept: set[str]) -> None:
        for old, _ in list(self.versions):
            if old not in kept:
                self._delete(old)

    def _delete(self, name: str) -> None:
        if self._api is None:
            import wandb

            self._api = wandb.Api()
        self._api.artifact(name, type="model").delete(delete_aliases=True)
        self.versions = [v for v in self.versions if v[0] != name]
        self.deleted.append(name)
