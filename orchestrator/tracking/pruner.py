"""Online runs: superseded model versions deleted through W&B's public API."""

from __future__ import annotations

from typing import Any


class VersionPruner:
    """Online runs with ``keep`` other than ``all``: once a version is committed, every older
    version of the run's model that is neither the best (the newest improvement) nor, with
    ``best_and_last``, the newest, is deleted through W&B's public API. ``api``: a
    ``wandb.Api`` (made when first needed)."""

    def __init__(self, keep: str, api: Any = None) -> None:
        self.keep = keep
        self._api = api
        self.versions: list[tuple[str, bool]] = []  # (qualified name, improvement), oldest first
        self.deleted: list[str] = []

    def committed(self, artifact: Any, is_best: bool) -> None:
        artifact.wait()  # its version is known, and it is there before others go
        name = artifact.qualified_name
        if any(v[0] == name for v in self.versions):
            return  # the same files logged again (a moved alias): no new version
        self.versions.append((name, is_best))
        improvements = [n for n, best in self.versions if best]
        if self.keep == "best" and improvements:
            kept = {improvements[-1]}
        else:  # the newest (the last), and the newest improvement (the best)
            kept = {name, *improvements[-1:]}
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
