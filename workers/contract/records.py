"""The records that cross processes or are written to disk, as types: one epoch's evaluation
record (the history, W&B, the terminal), a checkpoint's ``metadata.json``, its training state
(``train_state.pt``), and a run's ``summary.json``.

Pure types, no torch and no Ray: the driver's ``best`` command imports them without either.
Only the checker reads them; at run time each record is the plain dict it always was, so what
is on disk does not change.

The open part. An evaluation reports its split metrics under names the workload chooses
(``train_loss``, ``val_loss``, ``val_<metric>``, ``<monitor>_smoothed``; ``test_<metric>``
after the run), so a record holds those keys beside the fixed ones below. A TypedDict cannot
name keys it does not know (PEP 728's ``extra_items`` is not in mypy yet): the fixed keys are
typed here, and code that reads a metric by a name it computes reads the record as a
``Mapping[str, Any]`` (``split_metrics`` gives the metrics alone, as floats).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from typing_extensions import NotRequired, TypedDict

SPLIT_PREFIXES = ("train_", "val_")  # an evaluation's own metrics; ``test_`` comes after the run

Mode = Literal["min", "max"]


class LineageSegment(TypedDict):
    """A stretch of epochs that one trial of a population-based search trained."""

    trial_id: str
    epochs: list[int]  # [first, last]


class FileDigest(TypedDict):
    """What was written for one of a checkpoint's files (``checkpoint.integrity``)."""

    size: int
    sha256: str


class EpochRecord(TypedDict, total=False):
    """One evaluation, as the history (``history.json``), W&B and the terminal receive it
    (``orchestrator.results.epochs.epoch_record``), plus its split metrics (the open part).

    ``epoch`` and ``checkpoint`` are always there; the rest when the run reported them:
    ``step`` and ``global_step`` in a run that evaluates by steps (or every step-counting
    engine's), the timings of a save, ``stop_reason`` on the evaluation the tracker stopped at.
    """

    epoch: int
    step: int | None
    global_step: int | None
    lr: float
    is_best: bool
    epoch_seconds: float
    gather_seconds: float
    snapshot_seconds: float
    save_blocked_seconds: float
    workers: int
    stop_reason: str
    weights: Literal["raw", "ema"]  # train.ema_decay: which weights the values are
    checkpoint: str | None  # the checkpoint directory's name; None: no model saved


class SmootherState(TypedDict):
    """``decisions.tracker``'s smoothing of the monitored value."""

    ema: float | None
    window: int | None
    value: float | None
    recent: list[float]


class TopKEntry(TypedDict):
    """One of the K best evaluations (``checkpoint.keep_top_k``, ``decisions.top_k``): the
    value decided on (smoothed if asked) and where it falls."""

    value: float
    epoch: int
    global_step: int | None


class TrackerState(TypedDict):
    """``BestTracker.state_dict()``: plain numbers and strings (a weights_only torch file and
    JSON both hold it). ``progress_value`` is missing from a state saved before it was kept."""

    monitor: str
    mode: Mode
    min_delta: float
    patience: int | None
    best_value: float | None
    best_epoch: int | None
    best_metrics: dict[str, Any] | None
    epochs_without_improvement: int
    improvements: int
    progress_value: NotRequired[float | None]
    smoother: SmootherState | None
    top_k: NotRequired[list[TopKEntry]]  # checkpoint.keep_top_k > 1 only, best first
    # tracker.also_monitor only: each also-monitor's tracker state (the primary's holds them)
    also_monitor: NotRequired[list[TrackerState]]


class TrainState(TypedDict):
    """``train_state.pt``: what a resume continues from besides the weights and optimizer.

    ``step``, ``global_step`` and ``consumed`` in a checkpoint taken within an epoch (by steps,
    or a preemption); ``running_loss`` ([sum, count] since the last evaluation) in a
    preemption's; ``extras`` when the loop keeps objects with a ``state_dict`` (resume
    checkpoints only); ``lineage`` in a population-based search's trial (its ancestors).
    """

    epoch: int
    tracker: TrackerState
    seed: int
    step: NotRequired[int]
    global_step: NotRequired[int]
    consumed: NotRequired[int | None]  # None: at the epoch's end
    running_loss: NotRequired[list[float]]
    extras: NotRequired[dict[str, Any]]
    lineage: NotRequired[list[LineageSegment]]
    optimizer: NotRequired[dict[str, Any]]  # added by ``checkpoint.snapshot``, when there is one
    # train.ema_decay: a resume checkpoint whose model file holds the EMA (it won) keeps the
    # raw weights here, which training continues from (the EMA itself is in ``extras``)
    raw_weights: NotRequired[dict[str, Any]]


class CheckpointMetadata(TypedDict):
    """``metadata.json``, written last in a checkpoint directory: the evaluation's record
    (its split metrics, the open part, included) and who saved it, why and how.

    A preemption's resume checkpoint is not an evaluation: it has no split metrics and no
    ``test_split``. ``files`` is added by the writer (``checkpoint.writer``); the overall best
    model a search exports (``best_model/``) also says which trial it is
    (``trial_id``, ``hyperparameters``, ``source_checkpoint``).
    """

    epoch: int
    step: NotRequired[int | None]
    global_step: NotRequired[int | None]
    monitor: str
    mode: Mode
    mode_source: str
    is_best: bool
    saved_because: str
    world_size: int
    workers: int
    seed: int
    config: dict[str, Any]  # RunConfig.to_dict()
    test_split: NotRequired[bool]  # missing: a checkpoint written before it was recorded
    # train.ema_decay: which weights were saved; averaged: checkpoint.average_top_k's
    weights: NotRequired[Literal["raw", "ema", "averaged"]]
    lineage: NotRequired[list[LineageSegment]]
    files: NotRequired[dict[str, FileDigest]]
    trial_id: NotRequired[str]
    hyperparameters: NotRequired[dict[str, Any]]
    source_checkpoint: NotRequired[str]
    top_k_rank: NotRequired[int]  # keep_top_k > 1: its rank among the K when it was saved
    # checkpoint.average_top_k: the average that beat the best; the checkpoints it averages
    averaged_from: NotRequired[list[str]]
    best_for: NotRequired[list[str]]  # tracker.also_monitor: the monitors whose best it is
    provenance: NotRequired[dict[str, Any]]  # code, packages, data (``loop.provenance``)


class KeptCheckpoint(TypedDict):
    """A complete checkpoint in storage (``orchestrator.results.checkpoints``)."""

    epoch: int
    path: str
    is_best: bool
    metadata: CheckpointMetadata


class SummaryCheckpoint(TypedDict):
    """A kept checkpoint, as ``summary.json`` lists it."""

    epoch: int
    global_step: int | None
    path: str
    is_best: bool
    weights: NotRequired[Literal["raw", "ema", "averaged"]]  # as its metadata says


class AveragedRecord(TypedDict):
    """``checkpoint.average_top_k``, in ``summary.json``: the average of the K best models
    (``averaged_from``, best first), its monitored value on validation (``value``, null when
    it was not scored), the single best's (``best_value``), whether the average won (and is
    then ``best_checkpoint``: ``path``), and by how much it is better (``by``, negative:
    worse). ``skipped`` says why nothing was averaged (fewer than K models kept)."""

    k: int
    averaged_from: list[str]
    value: float | None
    best_value: float | None
    won: bool
    by: float | None
    path: NotRequired[str]
    batch_norm_recomputed: NotRequired[bool]
    metrics: NotRequired[dict[str, float]]
    skipped: NotRequired[str]


class RankedCheckpoint(TypedDict):
    """One of the K best models a run kept (``checkpoint.keep_top_k`` > 1), as
    ``summary.json``'s ``best_checkpoints`` lists them, best first: ``rank`` is its final
    rank (1: the best), ``value`` the monitored value decided on (smoothed if asked)."""

    rank: int
    path: str
    epoch: int
    step: int | None
    global_step: int | None
    value: float
    is_best: bool


class MonitorBest(TypedDict):
    """One of ``tracker.also_monitor``'s bests, as ``summary.json``'s ``best_by_monitor``
    names it by its metric: its mode, its evaluation, its model (None: not kept) and that
    model's test metrics (the same as ``test_metrics`` when it is the primary's best)."""

    mode: Mode
    value: float
    checkpoint: str | None
    epoch: int
    step: int | None
    global_step: int | None
    metrics: dict[str, Any]
    test_metrics: dict[str, Any] | None


class WandbInfo(TypedDict, total=False):
    """The W&B run, in ``summary.json``: ``mode`` and ``run`` always; ``sync`` (offline) or
    ``url`` (online); the model artifact; the logging calls that failed (``errors``)."""

    mode: str
    run: str | None
    url: str
    sync: str
    artifact: str | None
    logged_epochs: list[int]
    errors: list[str]


class TrialFields(TypedDict, total=False):
    """What a search's trial adds to its ``summary.json``."""

    trial_id: str
    hyperparameters: dict[str, Any]
    errored: bool
    trained_in: Literal["in_trial", "ray_train"]


class Summary(TypedDict):
    """``summary.json``: a finished (or stopped) run (``orchestrator.results.summary``).

    ``test_error`` only when the test split could not be scored; ``wandb`` once the W&B run
    closed (always, in the file); a search's trial adds ``trial_id``, ``hyperparameters``,
    ``errored`` and ``trained_in`` (``in_trial``: in its Tune trial's own process;
    ``ray_train``: as a Ray Train run).
    """

    name: str
    run_dir: str
    start: str
    status: str  # completed | stopped_early | interrupted | failed
    monitor: str
    mode: Mode
    mode_source: str
    policy: str
    best_checkpoint: str | None
    best_checkpoints: NotRequired[list[RankedCheckpoint]]  # keep_top_k > 1: best first
    averaged: NotRequired[AveragedRecord]  # checkpoint.average_top_k
    best_by_monitor: NotRequired[dict[str, MonitorBest]]  # tracker.also_monitor only
    best_epoch: int | None
    best_step: int | None
    best_global_step: int | None
    best_metrics: EpochRecord | None  # the best record, without ``checkpoint``
    test_metrics: dict[str, float] | None
    test_error: NotRequired[str]
    epochs_completed: int
    global_step: int | None
    epochs_planned: int
    stopped_early: bool
    stop_reason: str | None
    nonfinite: list[str]
    checkpoints: list[SummaryCheckpoint]
    history: list[EpochRecord]
    config: dict[str, Any]  # RunConfig.to_dict()
    wandb: NotRequired[WandbInfo]
    trial_id: NotRequired[str]  # TrialFields
    hyperparameters: NotRequired[dict[str, Any]]
    errored: NotRequired[bool]
    trained_in: NotRequired[Literal["in_trial", "ray_train"]]
    # code, packages, data (``loop.provenance``); null where the run's driver did not compute it
    provenance: NotRequired[dict[str, Any] | None]
    # what a --resume found changed: [{epoch, what, before, after}]
    provenance_changes: NotRequired[list[dict[str, Any]]]


def split_metrics(record: Mapping[str, object]) -> dict[str, float]:
    """The open part of a record: its split metrics (``train_*``, ``val_*``) that are
    numbers, in the record's order."""
    return {k: float(v) for k, v in record.items()
            if k.startswith(SPLIT_PREFIXES) and isinstance(v, (int, float))
            and not isinstance(v, bool)}
