"""Drop-in fastai callbacks that save the best model and say what it is (no Ray needed).

- ``SaveBestModelCallback``: fastai's ``SaveModelCallback`` (the same arguments, decisions and
  ``models/<fname>.pth`` files, which ``learn.load`` reads) that also records the saved epoch
  and every metric of it (``last_saved_metadata``), writes that beside the model as
  ``models/<fname>.json``, writes both atomically, and writes on rank 0 only under fastai's
  distributed training.
- ``WandbBestModelCallback``: logs every epoch's metrics to the current W&B run and, at the
  end of fit, the saved model as an artifact whose metadata is the saved epoch's metrics
  (numbers), with aliases ``epoch-N`` and ``best``, plus ``best_*`` in the run's summary.
  Unlike fastai's ``WandbCallback`` it does not read the Learner's arguments (which crashes
  with fastcore 2.2.39) and never labels the last epoch's metrics as the best model's.

Epochs are fastai's: counted from 0, as in the Recorder's table and ``every_epoch``'s names.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback, TrackerCallback
from fastai.torch_core import get_model, rank_distrib
from fastcore.xtras import join_path_file

from workers.checkpoint.writer import torch_bytes
from workers.compat import fastai_save_model_callback
from workers.files import atomic_write_bytes, atomic_write_json

# Recorder columns that are not metrics of the epoch.
_NOT_METRICS = ("epoch", "time")


def epoch_row(learn: Any) -> dict[str, float] | None:
    """The Recorder's last row as ``{"epoch": i, name: value, ...}`` (None if it is empty).

    ``recorder.values[i]`` lines up with ``metric_names[1:]`` (without the trailing 'time');
    an epoch skipped by ``fit(start_epoch=...)`` leaves an empty row.
    """
    recorder = getattr(learn, "recorder", None)
    if recorder is None or not recorder.values or len(recorder.values[-1]) == 0:
        return None
    names = [n for n in recorder.metric_names[1:] if n not in _NOT_METRICS]
    # Recorder.before_fit starts a fresh table
    row: dict[str, float] = {"epoch": len(recorder.values) - 1}
    # (a row is shorter when fastai cancelled a phase of the epoch)
    values = zip(names, recorder.values[-1], strict=False)
    row.update({name: float(value) for name, value in values})
    return row


class SaveBestModelCallback(fastai_save_model_callback()):  # type: ignore[misc]  # made at import
    """``SaveModelCallback`` that documents the model it saved (see the module docstring).

    ``last_saved_metadata``: the metadata of the file at ``last_saved_path`` (the epoch, every
    Recorder metric of that epoch, ``monitor``, ``comp``, ``saved_because`` and ``path``).
    ``best_metadata``: the same for the monitor's best epoch of this fit (it differs from the
    saved file's with ``at_end`` or ``every_epoch``).
    """

    def __init__(self, monitor: str = "valid_loss", comp: Any = None, min_delta: float = 0.0,
                 fname: str = "model", every_epoch: bool | int = False, at_end: bool = False,
                 with_opt: bool = False, reset_on_fit: bool = True) -> None:
        super().__init__(monitor=monitor, comp=comp, min_delta=min_delta, fname=fname,
                         every_epoch=every_epoch, at_end=at_end, with_opt=with_opt,
                         reset_on_fit=reset_on_fit)
        self.last_saved_metadata: dict[str, Any] | None = None
        self.best_metadata: dict[str, Any] | None = None
        self._reason = "improvement"

    def before_fit(self) -> None:
        super().before_fit()
        if self.reset_on_fit:
            self.best_metadata = None

    def after_epoch(self) -> None:
        if epoch_row(self.learn) is None:
            return  # skipped by fit(start_epoch=...): nothing to compare (fastai's own raises)
        if self.every_epoch:
            # fastai does not track the best value here; tracking it changes no decision (no
            # load at the end with every_epoch) and tells which saved epoch was the best.
            TrackerCallback.after_epoch(self)
            self._reason = "every_epoch"
            saved_before = self.last_saved_metadata
            super().after_epoch()
            if self.new_best:
                saved_now = self.last_saved_metadata is not saved_before
                self.best_metadata = self.last_saved_metadata if saved_now else self._metadata(None)
            return
        self._reason = "improvement"
        super().after_epoch()  # compares, and saves through save_model on a new best
        if self.new_best:
            self.best_metadata = self.last_saved_metadata

    def after_fit(self, **kwargs: Any) -> None:
        self._reason = "at_end"
        super().after_fit(**kwargs)

    def _metadata(self, path: Path | None) -> dict[str, Any]:
        return {**(epoch_row(self.learn) or {}), "monitor": self.monitor,
                "comp": getattr(self.comp, "__name__", str(self.comp)),
                "saved_because": self._reason if path else None,
                "path": str(path) if path else None}

    def save_model(self, name: str) -> None:
        # The same file as learn.save(name, with_opt=...): a torch.save'd state dict (or
        # {'model', 'opt'}), written atomically with its metadata beside it.
        path = join_path_file(name, self.learn.path / self.learn.model_dir, ext=".pth")
        metadata = self._metadata(path)
        if rank_distrib() == 0:
            state = get_model(self.learn.model).state_dict()
            opt = getattr(self.learn, "opt", None)
            if self.with_opt and opt is not None:
                state = {"model": state, "opt": opt.state_dict()}
            atomic_write_bytes(path, torch_bytes(state))
            atomic_write_json(path.with_suffix(".json"), metadata)
        self.last_saved_path, self.last_saved_metadata = path, metadata


class WandbBestModelCallback(Callback):
    """Per-epoch metrics to W&B, and at the end of fit the saved model as an artifact.

    ``run``: a W&B run (default: ``wandb.run``; call ``wandb.init`` first). The model is the
    one a ``SaveBestModelCallback`` on the Learner saved; without one, one with default
    arguments is added for the fit (as fastai's ``WandbCallback(log_model=True)`` does).
    Logs from rank 0 only under fastai's distributed training.
    """

    order = SaveModelCallback.order + 1  # after the saver, in after_epoch and after_fit

    def __init__(self, log_model: bool = True, artifact_name: str | None = None,
                 run: Any = None) -> None:
        self.log_model, self.artifact_name, self._given_run = log_model, artifact_name, run
        self._wandb_run: Any = None
        self.saver: SaveBestModelCallback | None = None
        self._added_saver = False

    def before_fit(self) -> None:
        self.active = (rank_distrib() == 0 and not hasattr(self.learn, "lr_finder")
                       and not hasattr(self.learn, "gather_preds"))
        if not self.active:
            return
        import wandb

        self._wandb_run = self._given_run or wandb.run
        if self._wandb_run is None:
            raise ValueError("WandbBestModelCallback: call wandb.init() before fitting")
        self.saver = next((cb for cb in self.learn.cbs if isinstance(cb, SaveBestModelCallback)),
                          None)
        self._added_saver = self.log_model and self.saver is None
        if self._added_saver:
            self.saver = SaveBestModelCallback()
            self.learn.add_cb(self.saver)
            self.saver("before_fit")  # this event's callback list was fixed before it was added

    def after_epoch(self) -> None:
        row = epoch_row(self.learn) if self.active else None
        if row is not None:
            self._wandb_run.log(row)

    def after_fit(self) -> None:
        if not self.active:
            return
        best = self.saver.best_metadata if self.saver else None
        if best:
            metrics = {k: v for k, v in best.items() if isinstance(v, float)}
            self._wandb_run.summary.update({**{f"best_{k}": v for k, v in metrics.items()},
                                            "best_epoch": best["epoch"]})
        if self.log_model and self.saver is not None:
            self._log_saved_model(self.saver, best)
        if self._added_saver:
            self.learn.remove_cb(self.saver)

    def _log_saved_model(self, saver: SaveBestModelCallback, best: dict[str, Any] | None) -> None:
        import wandb

        path, metadata = saver.last_saved_path, saver.last_saved_metadata
        if path is None or not Path(path).exists():
            print("WandbBestModelCallback: no saved model to log")
            return
        assert metadata is not None  # save_model sets it together with last_saved_path
        artifact = wandb.Artifact(self.artifact_name or saver.fname, type="model",
                                  metadata=_json_numbers(metadata))
        # add_file copies the file as it is now: the model on disk, whichever mode saved it.
        artifact.add_file(str(path), name=Path(path).name)
        beside = Path(path).with_suffix(".json")
        if beside.exists():
            artifact.add_file(str(beside), name=beside.name)
        aliases = [f"epoch-{metadata.get('epoch')}"]
        if best is not None and best.get("epoch") == metadata.get("epoch"):
            aliases.append("best")
        self._wandb_run.log_artifact(artifact, aliases=aliases)


def _json_numbers(metadata: dict[str, Any]) -> dict[str, Any]:
    """W&B stores metadata as JSON, which has no NaN: non-finite values become None."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in metadata.items()}
