"""Weights & Biases, all of it: one run per training run, logged from the driver process only.

The controller's ``RunRecorder`` streams each epoch's record (and the checkpoint it
persisted, if any) to the driver; ``WandbRun.handle`` logs the metrics with the epoch as the
step and logs persisted models as versions of one ``model`` artifact, whose metadata is THAT
checkpoint's ``metadata.json``. ``finish`` writes ``best_*`` (from the best checkpoint's own
metadata, so the two can never disagree), ``test_*`` and the training-curve plot.

``NullRun`` is the complete do-nothing twin (``wandb.mode: disabled``): the same methods,
wandb never imported, so callers never ask whether W&B is on.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, cast

from orchestrator import storage
from orchestrator.errors import UserError
from orchestrator.tracking.mode import wandb_mode
from orchestrator.tracking.pruner import VersionPruner
from orchestrator.tracking.rules import (
    LIVE,
    artifact_name,
    average_won,
    averaged_aliases,
    averaged_record,
    best_summary,
    kept_at_end,
    model_logging,
    monitor_aliases,
    monitors_summary,
    rank_aliases,
    reference_uri,
    version_alias,
)
from orchestrator.tracking.staging import staged_path
from workers.compat import wandb_settings
from workers.contract.config import RunConfig
from workers.contract.names import CARD_FILE, METADATA_FILE, STAGED_FILES, point
from workers.contract.records import EpochRecord, Summary, WandbInfo


def point_wandb_at_endpoint(storage_path: str) -> None:
    """W&B reads a custom S3 endpoint from ``AWS_S3_ENDPOINT_URL``; pyarrow from the URI's
    ``endpoint_override``. Set the former from the latter unless the user set it."""
    from urllib.parse import parse_qs, urlparse

    query = parse_qs(urlparse(storage_path).query)
    if "endpoint_override" in query and not os.environ.get("AWS_S3_ENDPOINT_URL"):
        endpoint = query["endpoint_override"][0]
        if "://" not in endpoint:
            endpoint = f"{query.get('scheme', ['https'])[0]}://{endpoint}"
        os.environ["AWS_S3_ENDPOINT_URL"] = endpoint
        if "region" in query:
            os.environ.setdefault("AWS_REGION", query["region"][0])


class TrackingRun(Protocol):
    """What a run does with W&B, on or off: ``WandbRun`` and its do-nothing twin ``NullRun``."""

    # Read-only here: WandbRun narrows ``log_model_setting`` to wandb.log_model's choices.
    @property
    def mode(self) -> str: ...

    @property
    def log_model_setting(self) -> str: ...  # what the controller stages for W&B as it goes

    def handle(self, record: EpochRecord, staged_model: str | None) -> None: ...

    def catch_up(self, history: list[EpochRecord], run_dir: str) -> None: ...

    def finish(self, summary: Summary, plot_path: str | None,
               exit_code: int = 0, card_path: str | None = None) -> WandbInfo: ...

    def finish_search(self, board: list[dict[str, Any]],
                      best_dir: str | None, card_path: str | None = None) -> WandbInfo: ...

    def abort(self) -> None: ...


class NullRun:
    """W&B off: every method of ``WandbRun``, doing nothing."""

    mode = "disabled"
    log_model_setting = "none"  # what the controller stages for this run: nothing

    def handle(self, record: EpochRecord, staged_model: str | None) -> None:
        pass

    def catch_up(self, history: list[EpochRecord], run_dir: str) -> None:
        pass

    def finish(self, summary: Summary, plot_path: str | None,
               exit_code: int = 0, card_path: str | None = None) -> WandbInfo:
        return {"mode": self.mode, "run": None, "artifact": None}

    def finish_search(self, board: list[dict[str, Any]], best_dir: str | None,
                      card_path: str | None = None) -> WandbInfo:
        return {"mode": self.mode, "run": None, "artifact": None}

    def abort(self) -> None:
        pass


class WandbRun:
    def __init__(self, run: Any, cfg: RunConfig, mode: str, label: str,
                 extra_metadata: dict[str, Any] | None = None) -> None:
        self.run = run
        self.extra_metadata = extra_metadata or {}  # e.g. a trial's id and hyperparameters
        self.cfg = cfg
        self.mode = mode
        self.keep = cfg.wandb.keep
        # The one place the path is chosen; ``handle`` is the live path, ``_log_kept`` the other.
        self.path = model_logging(cfg.wandb.log_model, cfg.wandb.keep, mode,
                                  cfg.wandb.model_files)
        self.live = self.path == LIVE
        self.references = cfg.wandb.model_files == "reference"
        if self.references:
            point_wandb_at_endpoint(cfg.storage_path)
        # What the controller stages for W&B while the run goes: nothing when models are
        # logged at the end, from the checkpoints.
        self.log_model_setting = cfg.wandb.log_model if self.live else "none"
        self.pruner = (VersionPruner(cfg.wandb.keep, top_k=cfg.checkpoint.keep_top_k)
                       if self.live and mode == "online" and cfg.wandb.keep != "all" else None)
        self.artifact = artifact_name(label)
        self.logged_versions: list[int] = []  # their epochs (global steps: by_steps)
        # The version each of the aliases best, top-2, ... is on (names.point).
        self.alias_at: dict[str, tuple[int, int]] = {}
        self.last_at = (0, 0)  # names.point of the last record logged
        # Curves over the epoch (the global step in a run that evaluates by steps), not W&B's
        # step: epochs trained again after a restart are logged again (W&B drops rows whose
        # step it has passed) and land on their epoch.
        self.by_steps = bool(cfg.train.eval_every_n_steps)
        # model_card.md, added to the best model's version once the run has written it
        # (``finish``): (the best checkpoint's path, the card's), and the versions holding it.
        self.card: tuple[str, str] | None = None
        self.carded: set[tuple[int, int]] = set()
        self.axis = "global_step" if self.by_steps else "epoch"
        run.define_metric(self.axis)
        run.define_metric("*", step_metric=self.axis)

    def handle(self, record: EpochRecord, staged_model: str | None) -> None:
        """One epoch; ``staged_model``: a model the recorder set aside for W&B (deleted here)."""
        values = {k: v for k, v in record.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        values["is_best"] = int(bool(record.get("is_best")))
        self.run.log(values)
        self.last_at = max(self.last_at, point(record))
        if staged_model:
            self.log_model(staged_model, storage.read_json(storage.join(staged_model,
                                                                        METADATA_FILE)))
            storage.delete_dir(staged_model)

    def catch_up(self, history: list[EpochRecord], run_dir: str) -> None:
        """Log what never reached this process live, from the run's own record: epochs whose
        results a scheduler dropped when it stopped a trial, and the models staged for them."""
        for record in history:
            if point(record) > self.last_at:
                self.handle(record, staged_path(run_dir, record.get("checkpoint")))

    def log_model(self, checkpoint_path: str, metadata: Mapping[str, Any], *,
                  name: str | None = None, aliases: list[str] | None = None,
                  prune: bool = True) -> None:
        """``prune``: offered to the online pruner, which ranks the run's evaluations (not
        an average of them); ``name``: another artifact than the run's model, never pruned."""
        import wandb

        metadata = {**metadata, **self.extra_metadata}
        artifact = wandb.Artifact(name or self.artifact, type="model", metadata=metadata)
        if aliases is None:
            # While the run goes, ``best`` marks the newest improvement only where every
            # improvement is saved (policy best); ``finish`` puts it on the best epoch's version.
            live_best = metadata.get("is_best") and self.cfg.checkpoint.policy == "best"
            aliases = [version_alias(metadata, self.by_steps)] + (["best"] if live_best else [])
        for alias in aliases:
            self.alias_at[alias] = point(metadata)
        card = self.card[1] if self.card and self.card[0] == checkpoint_path else None
        if self.references and storage.is_uri(checkpoint_path):
            # Nothing uploaded twice: W&B records each object's address and ETag.
            for file_name in STAGED_FILES:
                artifact.add_reference(reference_uri(storage.join(checkpoint_path, file_name)),
                                       name=file_name)
            if card:
                self._add_card(artifact, card)
            logged = self.run.log_artifact(artifact, aliases=aliases)
        else:
            if card:
                self._add_card(artifact, card)
            logged = self._log_copies(artifact, checkpoint_path, aliases)
        if card:
            self.carded.add(point(metadata))
        version = int(metadata["global_step"] if self.by_steps else metadata["epoch"])
        if version not in self.logged_versions:  # a moved alias is no new model
            self.logged_versions.append(version)
        if self.pruner is not None and name is None and prune:
            self.pruner.committed(logged, bool(metadata.get("is_best")), metadata)

    @staticmethod
    def _add_card(artifact: Any, card: str) -> None:
        """The model card as a file of the artifact (a local copy of one in an object store;
        W&B copies it into its staging area at once)."""
        if storage.is_uri(card):
            with tempfile.NamedTemporaryFile(suffix=".md", delete=False) as local:
                local.write(storage.read_bytes(card))
            card = local.name
        artifact.add_file(card, name=CARD_FILE)

    def _log_copies(self, artifact: Any, checkpoint_path: str, aliases: list[str]) -> Any:
        # add_file's default "mutable" policy copies each file into W&B's staging area at
        # once, so a local checkpoint is added as it is (one copy: W&B's), and one in an object
        # store goes through a temporary local file, which may go once log_artifact returns.
        if not storage.is_uri(checkpoint_path):
            for name in STAGED_FILES:
                artifact.add_file(str(Path(checkpoint_path) / name), name=name)
            return self.run.log_artifact(artifact, aliases=aliases)
        with tempfile.TemporaryDirectory() as local:
            for name in STAGED_FILES:
                target = Path(local) / name
                target.write_bytes(storage.read_bytes(storage.join(checkpoint_path, name)))
                artifact.add_file(str(target), name=name)
            return self.run.log_artifact(artifact, aliases=aliases)

    def finish(self, summary: Summary, plot_path: str | None,
               exit_code: int = 0, card_path: str | None = None) -> WandbInfo:
        """``exit_code``: not 0 for a run that stopped before its end (W&B marks it failed);
        ``card_path``: model_card.md, added to the best model's version (logged again with it
        where it was logged while the run went)."""
        import wandb

        if card_path and summary.get("best_checkpoint"):
            self.card = (str(summary["best_checkpoint"]), card_path)
        best: Mapping[str, Any] = summary.get("best_metrics") or {}
        if best_checkpoint := summary.get("best_checkpoint"):
            # The artifact's metadata and the summary come from the same file.
            best = storage.read_json(storage.join(best_checkpoint, METADATA_FILE))
        if best:
            self.run.summary.update(best_summary(best, summary.get("test_metrics")))
        if self.live:
            self._move_best_alias(summary)
        else:
            self._log_kept(summary)
        if average_won(summary) and self.cfg.wandb.log_model != "none":
            self._log_averaged(summary)
        self._monitor_aliases(summary)
        if plot_path:
            last = summary["global_step"] if self.by_steps else summary["epochs_completed"]
            self.run.log({"training_curves": wandb.Image(plot_path), self.axis: last})
        return self._close({"artifact": self.artifact if self.logged_versions else None,
                            "logged_epochs": self.logged_versions}, exit_code)

    def _log_kept(self, summary: Summary) -> None:
        """Models logged at the end (``log_model: end``, or offline unless ``keep: all``): the
        kept ones only, read from the run's checkpoints."""
        from orchestrator.results.checkpoints import kept_checkpoints

        if self.cfg.wandb.log_model == "none" or not summary.get("run_dir"):
            return
        for path, metadata, aliases in kept_at_end(
                self.cfg.wandb.log_model, self.keep, summary.get("best_checkpoint"),
                kept_checkpoints(summary["run_dir"]), self.by_steps,
                [c["path"] for c in summary.get("best_checkpoints", [])],
                average_won(summary)):
            self.log_model(path, metadata, aliases=aliases)

    def _log_averaged(self, summary: Summary) -> None:
        """``checkpoint.average_top_k``'s average, when it won: a version of the run's model
        with ``best`` (moved from the single best, which keeps ``top-1``) and
        ``averaged-top-K``; its metadata is its own ``metadata.json`` and ``averaged`` (the
        models averaged, the two values). Logged after the K, so ``best`` ends on it."""
        path = summary["averaged"]["path"]
        metadata = {**storage.read_json(storage.join(path, METADATA_FILE)),
                    "averaged": averaged_record(summary)}
        self.log_model(path, metadata, aliases=averaged_aliases(summary["averaged"]["k"]),
                       prune=False)

    def _monitor_aliases(self, summary: Summary) -> None:
        """``tracker.also_monitor``: ``best_<metric>_*`` in the run summary, and ``best-<metric>``
        on each monitor's best model's version (logged again with it, as ``best`` is moved,
        where the alias sits elsewhere or nowhere)."""
        by_monitor = summary.get("best_by_monitor") or {}
        if not by_monitor:
            return
        self.run.summary.update(monitors_summary(by_monitor))
        if self.cfg.wandb.log_model == "none":
            return
        for path, aliases in monitor_aliases(by_monitor).items():
            metadata = storage.read_json(storage.join(path, METADATA_FILE))
            if any(self.alias_at.get(alias) != point(metadata) for alias in aliases):
                self.log_model(path, metadata,
                               aliases=[version_alias(metadata, self.by_steps), *aliases])

    def _move_best_alias(self, summary: Summary) -> None:
        """``best`` on the version of the summary's best epoch (with keep_top_k, ``top-2``,
        ... on the others of the K; ``top-1``, ... where the average of the K won and takes
        ``best``, ``_log_averaged``): logged again with that alias (the same files: W&B keeps
        one version and moves the alias) when the alias sits elsewhere, or on no version (a
        policy that logs other models, or a stopped run)."""
        best = summary.get("best_checkpoint")
        ranked = [c["path"] for c in summary.get("best_checkpoints", [])]
        for path, alias in rank_aliases(ranked or ([best] if best else []),
                                        average_won(summary)).items():
            metadata = storage.read_json(storage.join(path, METADATA_FILE))
            with_card = bool(self.card and self.card[0] == path)
            if self.alias_at.get(alias) != point(metadata) or (
                    with_card and point(metadata) not in self.carded):
                self.log_model(path, metadata,
                               aliases=[version_alias(metadata, self.by_steps), alias])

    def finish_search(self, board: list[dict[str, Any]], best_dir: str | None,
                      card_path: str | None = None) -> WandbInfo:
        """The experiment's run: the overall best model (findable as ``<name>-best-model``,
        alias ``best``, with the search's ``model_card.md``), the leaderboard as a table, the
        winner in the summary."""
        import wandb

        if best_dir and card_path:
            self.card = (best_dir, card_path)
        if best_dir is None:
            # The experiment has no epochs of its own: a summary with no best and no history
            # (``finish`` reads no other key without a plot and a run directory).
            return self.finish(cast(Summary, {"best_metrics": None, "history": []}), None)
        metadata = storage.read_json(storage.join(best_dir, METADATA_FILE))
        self.log_model(best_dir, metadata, name=f"{self.cfg.name}-best-model",
                       aliases=["best", board[0]["trial_id"]])
        columns: list[str | int] = ["rank", "trial_id", "status", "best_epoch",
                                    "hyperparameters", "best"]
        monitor = self.cfg.tracker.monitor
        table = wandb.Table(columns=columns, data=[
            [r["rank"], r["trial_id"], r["status"], r["best_epoch"],
             json.dumps(r["hyperparameters"]), r[f"best_{monitor}"]] for r in board])
        self.run.log({"leaderboard": table})
        self.run.summary.update({"best_trial": board[0]["trial_id"],
                                 f"best_{monitor}": board[0][f"best_{monitor}"]})
        return self._close({"artifact": f"{self.cfg.name}-best-model"})

    def _close(self, info: WandbInfo, exit_code: int = 0) -> WandbInfo:
        info = {"mode": self.mode, **info}
        if self.mode == "offline":
            info["run"] = str(Path(self.run.dir).parent)
            info["sync"] = f"wandb sync {info['run']}"
        else:
            info["run"] = self.run.path
            info["url"] = self.run.url
        self.run.finish(exit_code=exit_code)
        return info

    def abort(self) -> None:
        self.run.finish(exit_code=1)


def open_run(cfg: RunConfig, run_dir: str, *, group: str | None = None,
             job_type: str = "train", label: str | None = None,
             extra: dict[str, Any] | None = None,
             provenance: dict[str, Any] | None = None) -> NullRun | WandbRun:
    """Start the W&B run before any training: a bad key or no network fails here, not later.

    ``extra``: added to the run's config and to every model artifact's metadata.
    ``provenance``: the run's config's ``provenance`` (each model's metadata has its own).
    """
    mode = wandb_mode(cfg.wandb.mode)
    if mode == "disabled":
        return NullRun()
    import wandb

    # wandb writes its offline run under <dir>/wandb; keep it with the run when that is local.
    local_dir = run_dir if not storage.is_uri(run_dir) else os.path.abspath("wandb-runs")
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(
            project=cfg.wandb.project or cfg.name, entity=cfg.wandb.entity,
            name=label or cfg.name, reinit="create_new",
            group=group, job_type=job_type,
            config={**cfg.to_dict(), **(extra or {}),
                    **({"provenance": provenance} if provenance else {})},
            dir=local_dir, mode=mode,
            settings=wandb_settings(console="off", silent=True, init_timeout=30),
        )
    except Exception as exc:  # noqa: BLE001 - e.g. its free port taken meanwhile: once more
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"wandb.mode: could not start a W&B run in {mode} mode ({detail}); check "
            "WANDB_API_KEY / `wandb login`, or use --set wandb.mode=offline"
        ) from None
    return WandbRun(run, cfg, mode, label or cfg.name, extra)


