"""The Python API: ``from orchestrator import train, tune, load_best``.

The command line is a thin layer over these three. A config is a YAML path, a built-in
config's name (``"digits"``), a mapping of config keys or a ``RunConfig``; ``overrides`` are
``--set``'s ``KEY=VALUE`` strings or a mapping of dotted keys to values. Mistakes raise the
same one-line ``UserError`` the CLI prints; a run that fails or is interrupted writes its
record and raises ``TrainingError`` (its ``exit_code`` is the CLI's).

Importing this module imports neither torch nor Ray: a notebook pays for them on first use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.start.console import Console
from orchestrator.start.context import prepare

if TYPE_CHECKING:
    import torch

    from orchestrator.results.export import ExportResult
    from orchestrator.results.predict import Predictions
    from orchestrator.start.config_file import Overrides
    from workers.contract.config import RunConfig
    from workers.contract.records import CheckpointMetadata, EpochRecord, Summary



@dataclass(frozen=True)
class RunSummary:
    """A run's ``summary.json``, typed; ``record`` is the whole of it."""

    name: str
    status: str  # completed | stopped_early (failed and interrupted runs raise)
    run_dir: str
    monitor: str
    mode: str
    best_epoch: int | None
    best_metrics: EpochRecord | None
    test_metrics: dict[str, float] | None
    best_checkpoint: str | None
    epochs_completed: int
    history: list[EpochRecord] = field(repr=False)
    record: Summary = field(repr=False)

    @classmethod
    def from_record(cls, record: Summary) -> RunSummary:
        return cls(
            name=record["name"], status=record["status"], run_dir=record["run_dir"],
            monitor=record["monitor"], mode=record["mode"], best_epoch=record["best_epoch"],
            best_metrics=record["best_metrics"], test_metrics=record["test_metrics"],
            best_checkpoint=record["best_checkpoint"],
            epochs_completed=record["epochs_completed"], history=record["history"],
            record=record,
        )

    @property
    def best_value(self) -> float | None:
        """The monitored metric of the best model (``best_checkpoint``): the best epoch's, or
        the average's where ``checkpoint.average_top_k``'s average won (``best_metrics`` stay
        the best epoch's)."""
        averaged = self.record.get("averaged")
        if averaged and averaged["won"]:
            return averaged["value"]
        metrics: Mapping[str, Any] = self.best_metrics or {}  # the monitor: an open key
        return metrics.get(self.monitor)


@dataclass(frozen=True)
class SearchResult:
    """A search's ``leaderboard.json``, typed: ``trials`` best first."""

    name: str
    experiment_dir: str
    monitor: str
    mode: str
    best_model: str | None
    trials: list[dict[str, Any]] = field(repr=False)
    record: dict[str, Any] = field(repr=False)

    @property
    def best_trial(self) -> dict[str, Any] | None:
        return self.trials[0] if self.trials else None


@dataclass(frozen=True)
class BestModel:
    """The workload's model holding the best weights, and the checkpoint's metadata."""

    model: torch.nn.Module
    metadata: CheckpointMetadata
    checkpoint: str
    workload: Any = field(repr=False)  # the workload it was built from (its datasets, loss)


def _config(config: Any, overrides: Overrides | None) -> RunConfig:
    from orchestrator.start.config_file import load_config

    return load_config(config, overrides)


def train(config: Any, overrides: Overrides | None = None, *, resume: bool = False,
          overwrite: bool = False, verbose: bool = False,
          console: Console | None = None) -> RunSummary:
    """Train one run to its end (``orchestrator train``); its summary."""
    cfg = _config(config, overrides)
    prepared = prepare(cfg, resume=resume, overwrite=overwrite)  # before Ray is imported
    from orchestrator.training.driver import run_training

    record = run_training(cfg, console=console or Console(verbose=verbose), prepared=prepared)
    return RunSummary.from_record(record)


def tune(config: Any, overrides: Overrides | None = None, *, resume: bool = False,
         overwrite: bool = False, verbose: bool = False,
         console: Console | None = None) -> SearchResult:
    """Run a search to its end (``orchestrator tune``); its leaderboard. Trials that did not
    finish are on it with status ``interrupted`` or ``error``."""
    from orchestrator import storage
    from workers.contract.names import LEADERBOARD_FILE

    cfg = _config(config, overrides)
    prepared = prepare(cfg, resume=resume, overwrite=overwrite, kind="search")
    from orchestrator.search.runner import run_search

    run_search(cfg, console=console or Console(verbose=verbose), prepared=prepared)
    record = storage.read_json(storage.join(prepared.run_dir, LEADERBOARD_FILE))
    return SearchResult(name=record["name"], experiment_dir=record["experiment_dir"],
                        monitor=record["monitor"], mode=record["mode"],
                        best_model=record["best_model"], trials=record["trials"],
                        record=record)


def best_checkpoint(path: str | Path, rank: int | None = None,
                    monitor: str | None = None) -> str:
    """The best model's checkpoint of a run directory (its ``summary.json``) or a search
    directory (its ``leaderboard.json``), checked against its recorded sizes and digests.

    By default the record's best model: ``best_checkpoint``, which is the average of the K
    best where ``checkpoint.average_top_k``'s average won. ``rank``: the k-th of the K single
    models a run keeps (``checkpoint.keep_top_k``, ``best_checkpoints``; 1 is the single best,
    even where the average won). ``monitor``: the best model of one of
    ``tracker.also_monitor``'s metrics (``best_by_monitor``); ``tracker.monitor`` itself is the
    default's."""
    from orchestrator import storage
    from orchestrator.errors import UserError
    from orchestrator.results.checkpoints import verify_checkpoint
    from workers.contract.names import LEADERBOARD_FILE, SUMMARY_FILE

    if rank is not None and monitor is not None:
        raise UserError("load_best: rank ranks tracker.monitor's K best models and monitor "
                        "names another metric's best; pass one of them")
    root = storage.resolve(str(path))
    for name, key in ((LEADERBOARD_FILE, "best_model"), (SUMMARY_FILE, "best_checkpoint")):
        record_path = storage.join(root, name)
        if not storage.exists(record_path):
            continue
        try:
            record = storage.read_json(record_path)
            best: str | None = record.get(key)
            if rank is not None:
                best = ranked_checkpoint(record, rank, record_path, key)
            elif monitor is not None and monitor != record["monitor"]:
                best = monitor_checkpoint(record, monitor, record_path)
        except (ValueError, AttributeError, KeyError, TypeError) as exc:
            raise UserError(f"{record_path}: damaged, not the record this tool writes "
                            f"({type(exc).__name__}: {exc})") from None
        if not best:
            raise UserError(f"{record_path}: this run kept no best model (its checkpoint "
                            "policy saved none)")
        problem = verify_checkpoint(best)
        if problem:
            raise UserError(f"{best}: the best model is damaged: {problem}")
        return best
    raise UserError(f"{path}: no {SUMMARY_FILE} or {LEADERBOARD_FILE} here; pass a finished "
                    "run's or search's directory")


def ranked_checkpoint(record: Mapping[str, Any], rank: int, record_path: str,
                      key: str = "best_checkpoint") -> str:
    """The ``rank``-th of a run's ``best_checkpoints`` (``checkpoint.keep_top_k``; never the
    average of ``checkpoint.average_top_k``, which is no single model), or one line saying
    which ranks there are. A record without them has one rank: its best model (``key``)."""
    from orchestrator.errors import UserError

    ranked = record.get("best_checkpoints") or (
        [{"path": record[key]}] if record.get(key) else [])
    if not 1 <= rank <= len(ranked):
        kept = (f"the ranks are 1 to {len(ranked)} (checkpoint.keep_top_k: "
                f"{(record.get('config') or {}).get('checkpoint', {}).get('keep_top_k', 1)})"
                if len(ranked) > 1 else "rank 1 is its only best model")
        raise UserError(f"{record_path}: rank {rank} is out of range; {kept}")
    return str(ranked[rank - 1]["path"])


def monitor_checkpoint(record: Mapping[str, Any], monitor: str, record_path: str) -> str:
    """The best model of ``monitor``, one of the run's ``tracker.also_monitor`` metrics
    (``best_by_monitor``), or one line naming the monitors there are, or saying that its best
    evaluation's model was not kept."""
    from orchestrator.errors import UserError

    by_monitor: Mapping[str, Any] = record.get("best_by_monitor") or {}
    if monitor not in by_monitor:
        others = ", ".join(by_monitor)
        raise UserError(
            f"{record_path}: no best model for monitor {monitor!r}; the monitors are "
            f"{record['monitor']} (tracker.monitor)"
            + (f" and {others} (tracker.also_monitor)" if others else ""))
    best = by_monitor[monitor]
    if not best.get("checkpoint"):
        raise UserError(f"{record_path}: the model of {monitor}'s best evaluation (epoch "
                        f"{best.get('epoch')}) was not kept")
    return str(best["checkpoint"])


def load_best(path: str | Path, rank: int | None = None,
              monitor: str | None = None) -> BestModel:
    """The best model of a run or a search: the workload's model (built as in training, on
    CPU) holding the best weights, with the checkpoint's metadata (its epoch's metrics).

    The default is the record's ``best_checkpoint``: the average of the K best
    (``metadata["weights"] == "averaged"``) where ``checkpoint.average_top_k``'s average won.
    ``rank``: the k-th of the K single models a run keeps (``checkpoint.keep_top_k``), 1 to
    K; ``monitor``: the best model of a ``tracker.also_monitor`` metric. Out of range or
    unknown, one line says which there are."""
    return load_checkpoint(best_checkpoint(path, rank, monitor))


def load_checkpoint(checkpoint: str) -> BestModel:
    """``load_best``'s second half: the workload's model (built as in training, on CPU)
    holding one checkpoint's weights, with its metadata. ``predict``'s actors load the
    checkpoint the driver chose (and checked) through it."""
    from ray.train import Checkpoint

    from workers.checkpoint.load import load_metadata
    from workers.contract.config import RunConfig
    from workers.loop.scoring import load_model

    with Checkpoint(checkpoint).as_directory() as directory:  # local, or fetched from a URI
        metadata = load_metadata(directory)
        workload, model = load_model(RunConfig.model_validate(metadata["config"]), directory)
    model.eval()
    return BestModel(model=model, metadata=metadata, checkpoint=checkpoint, workload=workload)


def export(path: str | Path, format: str = "export", *, monitor: str | None = None,
           rank: int | None = None) -> ExportResult:
    """The best model of a run or a search (``rank`` and ``monitor`` as ``load_best``'s) as a
    ``torch.export`` program (``format="export"``, ``<path>/export/model.pt2``) or ONNX
    (``"onnx"``, ``model.onnx``; ``pip install 'ray-best-model-orchestrator[onnx]'``), traced on
    a validation batch (dynamic batch size) and kept only if its outputs match the saved
    model's on the whole validation split; its record is ``<path>/export/<format>.json``."""
    from orchestrator.results.export import export as export_model

    return export_model(path, format, monitor=monitor, rank=rank)


def predict(path: str | Path, data: str | None = None, split: str | None = None,
            out: str | None = None, *, batch_size: int = 256, num_actors: int = 2,
            use_gpu: bool = False, monitor: str | None = None, verbose: bool = False,
            console: Console | None = None) -> Predictions:
    """Batch inference with the best model of a run or a search (``monitor`` as
    ``load_best``'s) as a Ray Data job (``orchestrator predict``): Parquet rows (``data``, a
    local path or a URI) or the workload's own ``split`` (``"val"`` or ``"test"``) through
    ``num_actors`` actors (each loads the model once; a GPU each with ``use_gpu``) in batches
    of ``batch_size``, written to ``out`` as Parquet: each row's id, its ``logits`` and, for a
    classifier, its ``predicted`` class. See ``orchestrator.results.predict``."""
    from orchestrator.results.predict import predict as run_predict

    return run_predict(str(path), data, split, out, batch_size=batch_size,
                       num_actors=num_actors, use_gpu=use_gpu, monitor=monitor,
                       console=console, verbose=verbose)
