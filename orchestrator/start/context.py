"""What ``train`` and ``tune`` both do before anything trains, once, and what it leaves: one
typed ``RunContext``.

The order is the contract's: the run directory's fate is decided first (``prepare``: before Ray
or torch is imported, so a wrong name or a run that already exists costs a fraction of a
second); then ``preflight`` checks that the run fits the machine before starting Ray, starts
or joins Ray, checks the cluster's room, runs the command's own check on Ray (a search's
monitor), and opens the W&B run, which must work before the run directory is taken. Only
then does anything train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

from orchestrator import storage
from orchestrator.start.console import Console
from orchestrator.start.run_dir import SetAside, open_in, prepare_run_dir
from workers.contract.config import RunConfig

if TYPE_CHECKING:
    from orchestrator.start.cluster import Capacity
    from orchestrator.start.interrupts import SignalGuard
    from orchestrator.tracking.wandb_run import TrackingRun
    from orchestrator.training.datasets import RayDatasets


class StartMode(str, Enum):
    """How a run directory came to be trained in (``summary.json``'s ``start``)."""

    FRESH = "fresh"
    OVERWRITE = "overwrite"  # an earlier run of this name replaced
    RESUME = "resume"  # continued from its latest intact checkpoint
    TRIAL = "tune"  # one trial of a search (the search's own directory has one of the above)


@dataclass(frozen=True)
class Prepared:
    """A command's run directory with its fate decided, nothing started yet."""

    cfg: RunConfig
    run_dir: str
    start: StartMode
    nothing_to_resume: bool = False  # --resume of a run that does not exist yet: it starts

    def with_config(self, cfg: RunConfig) -> Prepared:
        return replace(self, cfg=cfg)


def prepare(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
            kind: str = "run") -> Prepared:
    """The one call per command that decides whether it resumes, replaces or starts a run
    (``kind``: run | search; a directory holding the other kind is refused)."""
    run_dir = storage.run_dir(cfg)
    start = StartMode(prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, kind=kind))
    # The same command for the first start and every restart (what a job's retries need).
    return Prepared(cfg, run_dir, start, nothing_to_resume=resume and start is StartMode.FRESH)


def start_line(prepared: Prepared, kind: str = "run") -> str:
    """The first line a command prints: how it starts (``kind``: run | search)."""
    name, run_dir = prepared.cfg.name, prepared.run_dir
    if prepared.nothing_to_resume:
        return f"nothing to resume in {run_dir}: starting a new {kind} {name!r} (--resume)"
    return {
        StartMode.FRESH: f"Starting {kind} {name!r} in {run_dir}",
        StartMode.OVERWRITE: f"Replacing the earlier {kind} {name!r} in {run_dir} "
                             "(--overwrite)",
        StartMode.RESUME: f"Resuming {kind} {name!r} from its latest checkpoint in {run_dir} "
                          "(--resume)",
    }[prepared.start]


@dataclass
class RunContext:
    """A run (or a search, or one of its trials) ready to train: what every later step needs."""

    cfg: RunConfig
    run_dir: str
    start: StartMode
    console: Console
    tracking: TrackingRun  # the W&B run, or its do-nothing twin
    use_gpu: bool
    guard: SignalGuard | None = None  # None in a trial's context: the search holds it
    capacity: Capacity | None = None
    replaced: SetAside | None = None  # an --overwrite's old run, aside until the new one trains
    ray_datasets: RayDatasets | None = None  # the Ray Dataset splits
    # Why tracker.mode is what it is (``contract.direction``): summary.json's mode_source.
    mode_source: str = "set by tracker.mode"
    # Code, packages and data (``workers.loop.provenance``), and what a --resume found changed.
    provenance: dict[str, Any] | None = None
    provenance_changes: list[dict[str, Any]] = field(default_factory=list)


def preflight(prepared: Prepared, *, kind: str, console: Console, guard: SignalGuard,
              fits: Callable[[Capacity], bool],
              open_tracking: Callable[[], TrackingRun],
              check_on_ray: Callable[[], None] = lambda: None) -> RunContext:
    """Ray started (or joined), the run checked against it, the W&B run opened and the run
    directory taken (``kind``: run | search). ``fits``: raises ``UserError`` when the
    command cannot be scheduled on that capacity, else says whether it uses GPUs."""
    from orchestrator.start.cluster import (
        attaches_to_cluster,
        cluster_capacity,
        init_ray,
        local_resources,
    )

    if not attaches_to_cluster():
        fits(local_resources())  # fail before starting Ray at all
    capacity = cluster_capacity(init_ray(console.verbose))
    use_gpu = fits(capacity)
    check_on_ray()
    # A bad W&B key or no network fails here, with the old run (if any) intact.
    # A replaced old run (or search) stays aside until workers have checked the workload.
    tracking, replaced = open_in(prepared.run_dir, prepared.start.value, kind, open_tracking,
                                 keep_replaced=True)
    return RunContext(cfg=prepared.cfg, run_dir=prepared.run_dir, start=prepared.start,
                      console=console, tracking=tracking, use_gpu=use_gpu, guard=guard,
                      capacity=capacity, replaced=replaced)
