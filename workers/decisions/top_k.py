"""The K best evaluations (``checkpoint.keep_top_k``): pure, no I/O, no torch.distributed.

One rule, used by everyone who must agree on which K models a run keeps: rank 0's tracker
(which evaluations are saved), Ray Train's retention (``checkpoint.policy.top_k_score``), the
driver's summary (``best_checkpoints``) and the W&B pruner.

- An evaluation enters when its value is finite and, once K are held, strictly better than
  the worst of them (a tie does not enter, as a tie is no improvement to the tracker).
- The K are ranked best first; equal values by their place in the run, the earlier first,
  so rank 1 is always the tracker's best (the first evaluation to reach the best value).
- When one enters a full set, the one that goes is the worst, and among equal worst values
  the EARLIEST. That is what Ray Train drops: it sorts checkpoints by score and, on equal
  scores, counts the later-reported one as the better. So the K that Ray keeps are exactly
  the K held here, ties included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from workers.contract.records import Mode, TopKEntry


def signed(value: float, mode: Mode) -> float:
    """Bigger is better: the value itself under ``max``, its negation under ``min``."""
    return value if mode == "max" else -value


def _at(entry: TopKEntry) -> tuple[int, int]:
    return entry["epoch"], entry.get("global_step") or 0


class TopK:
    """The K best evaluations so far, best first (``entries``)."""

    def __init__(self, k: int, mode: Mode) -> None:
        if k < 1:
            raise ValueError(f"checkpoint.keep_top_k must be >= 1, got {k}")
        self.k, self.mode = k, mode
        self.entries: list[TopKEntry] = []

    def enters(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if len(self.entries) < self.k:
            return True
        worst = min(signed(e["value"], self.mode) for e in self.entries)
        return signed(value, self.mode) > worst

    def add(self, value: float, epoch: int, global_step: int | None = None) -> int | None:
        """Offer one evaluation; its rank among the K when it enters (1: the best), else
        None."""
        if not self.enters(value):
            return None
        entry: TopKEntry = {"value": float(value), "epoch": int(epoch),
                            "global_step": global_step}
        self.entries.append(entry)
        self.entries.sort(key=lambda e: (-signed(e["value"], self.mode), _at(e)))
        if len(self.entries) > self.k:  # the worst goes; among equal worst, the earliest
            worst = min(signed(e["value"], self.mode) for e in self.entries)
            self.entries.remove(min((e for e in self.entries
                                     if signed(e["value"], self.mode) == worst), key=_at))
        return self.entries.index(entry) + 1

    def load(self, entries: Iterable[TopKEntry]) -> None:
        """A saved set, offered again in the order the run made them (a resume may keep
        fewer than were saved)."""
        self.entries = []
        for e in sorted(entries, key=_at):
            self.add(e["value"], e["epoch"], e.get("global_step"))


def top_k_of(entries: Iterable[TopKEntry], k: int, mode: Mode) -> list[TopKEntry]:
    """The K that a run's evaluations (in any order) leave, best first."""
    top = TopK(k, mode)
    top.load(entries)
    return top.entries
