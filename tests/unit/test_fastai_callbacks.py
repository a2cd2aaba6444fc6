"""The drop-in fastai callbacks in plain fastai scripts (no Ray): saver and W&B logging.

The training is the overfitting test task (tests/workloads/overfit.py) as a fastai Learner at a
constant lr: seeded, deterministic on CPU, and its validation loss is lowest in the middle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import fastai.callback.schedule  # noqa: F401 - registers Learner.fit_one_cycle
import pytest
import torch
from fastai.callback.tracker import SaveModelCallback

from tests.workloads.overfit_fastai import build
from workers.fastai_callbacks import SaveBestModelCallback, WandbBestModelCallback

WANDB_CLI = str(Path(sys.executable).parent / "wandb")
METRICS = ("train_loss", "valid_loss", "accuracy")  # the Recorder's columns for this Learner


def learner(path: Path):
    random.seed(0)  # fastai's DataLoaders seed their shuffling from `random`
    torch.manual_seed(0)
    learn = build(bs=8)
    learn.path = path
    return learn


def fit(learn, epochs: int, cbs: list, capsys=None, lr: float = 2e-3) -> list[int]:
    """Train quietly; returns the epochs fastai announced as 'Better model found'."""
    if capsys is not None:
        capsys.readouterr()
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs, lr=lr, cbs=cbs)
    if capsys is None:
        return []
    printed = capsys.readouterr().out
    return [int(e) for e in re.findall(r"Better model found at epoch (\d+)", printed)]


def recorder_row(learn, epoch: int) -> dict[str, float]:
    names = [n for n in learn.recorder.metric_names[1:] if n != "time"]
    return dict(zip(names, (float(v) for v in learn.recorder.values[epoch]), strict=True))


def valid_losses(learn) -> list[float]:
    return [float(row[1]) for row in learn.recorder.values]


def load_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_peer_check_same_epoch_same_weights_and_the_recorders_row(tmp_path, capsys):
    theirs = learner(tmp_path / "fastai")
    their_saves = fit(theirs, 10, [SaveModelCallback(fname="model")], capsys)
    ours = learner(tmp_path / "ours")
    saver = SaveBestModelCallback(fname="model")
    our_saves = fit(ours, 10, [saver], capsys)

    # The same seeded training, the same decisions every epoch.
    assert [list(map(float, r)) for r in ours.recorder.values] == \
        [list(map(float, r)) for r in theirs.recorder.values]
    losses = valid_losses(ours)
    best = losses.index(min(losses))
    assert 0 < best < 9, f"the monitored metric must peak in the middle: {losses}"
    assert our_saves == their_saves and their_saves[-1] == best

    # Identical weights in the two files, and both Learners end holding them.
    their_file, our_file = tmp_path / "fastai/models/model.pth", tmp_path / "ours/models/model.pth"
    assert saver.last_saved_path == our_file
    assert_same_tensors(load_state(their_file), load_state(our_file))
    assert_same_tensors(theirs.model.state_dict(), ours.model.state_dict())
    assert_same_tensors(ours.model.state_dict(), load_state(our_file))

    # The metadata beside the model is the Recorder's row of the saved epoch.
    on_disk = json.loads((tmp_path / "ours/models/model.json").read_text())
    assert on_disk == saver.last_saved_metadata == saver.best_metadata
    assert on_disk["epoch"] == best
    assert {k: on_disk[k] for k in METRICS} == recorder_row(ours, best)
    assert on_disk["monitor"] == "valid_loss" and on_disk["comp"] == "less"
    assert on_disk["saved_because"] == "improvement" and on_disk["path"] == str(our_file)
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in (tmp_path / "ours/models").iterdir()) == \
        ["model.json", "model.pth"]


def test_every_epoch_saves_each_nth_epoch_with_its_own_metadata(tmp_path):
    learn = learner(tmp_path)
    saver = SaveBestModelCallback(every_epoch=2)
    fit(learn, 6, [saver])
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir()) == [
        f"model_{e}.{ext}" for e in (0, 2, 4) for ext in ("json", "pth")
    ]
    for epoch in (0, 2, 4):
        metadata = json.loads((models / f"model_{epoch}.json").read_text())
        assert metadata["epoch"] == epoch and metadata["saved_because"] == "every_epoch"
        assert {k: metadata[k] for k in METRICS} == recorder_row(learn, epoch)
    assert saver.last_saved_path == models / "model_4.pth"
    # No best model is loaded at the end (as fastai): the Learner keeps its last weights.
    assert not torch.equal(learn.model.state_dict()["inner.0.weight"],
                           load_state(models / "model_4.pth")["inner.0.weight"])
    losses = valid_losses(learn)
    assert saver.best_metadata["epoch"] == losses.index(min(losses))


def test_at_end_the_file_is_the_final_model_and_says_so(tmp_path):
    learn = learner(tmp_path)
    saver = SaveBestModelCallback(at_end=True)
    fit(learn, 6, [saver])
    on_disk = json.loads((tmp_path / "models/model.json").read_text())
    assert on_disk == saver.last_saved_metadata
    assert on_disk["epoch"] == 5 and on_disk["saved_because"] == "at_end"
    assert {k: on_disk[k] for k in METRICS} == recorder_row(learn, 5)
    assert_same_tensors(load_state(tmp_path / "models/model.pth"), learn.model.state_dict())
    losses = valid_losses(learn)
    assert saver.best_metadata["epoch"] == losses.index(min(losses)) < 5


@pytest.mark.parametrize("reset_on_fit", [True, False])
def test_reset_on_fit_decides_whether_a_second_fit_must_beat_the_first(tmp_path, capsys,
                                                                      reset_on_fit):
    results = {}
    for name, cls in (("fastai", SaveModelCallback), ("ours", SaveBestModelCallback)):
        learn = learner(tmp_path / name)
        cb = cls(reset_on_fit=reset_on_fit)
        fit(learn, 8, [cb], capsys)
        first_best = cb.best
        # The first fit ended by loading its best model; the second one overfits further.
        second_saves = fit(learn, 3, [cb], capsys, lr=5e-2)
        results[name] = (first_best, second_saves, cb)
    (their_best, their_saves, _), (our_best, our_saves, saver) = results.values()
    assert our_best == their_best and our_saves == their_saves
    if reset_on_fit:
        assert our_saves[:1] == [0] and saver.last_saved_metadata["epoch"] == our_saves[-1]
    else:
        assert our_saves == []  # nothing beat the first fit's best: its file and record stay
        saved = json.loads((tmp_path / "ours/models/model.json").read_text())
        assert saved == saver.last_saved_metadata == saver.best_metadata
        assert saved["valid_loss"] == pytest.approx(our_best)


def test_rank_other_than_zero_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # what fastai's rank_distrib() reads
    learn = learner(tmp_path)
    saver = SaveBestModelCallback(every_epoch=True)
    fit(learn, 2, [saver])
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
    assert saver.last_saved_metadata["epoch"] == 1  # every rank knows what rank 0 saved


def test_a_resumed_fit_skips_its_first_epochs_without_crashing(tmp_path):
    # fastai's own TrackerCallbacks read an empty Recorder row for epochs that
    # fit(start_epoch=...) skips (fastai 2.8.12).
    learn = learner(tmp_path / "fastai")
    with pytest.raises(IndexError), learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(4, 2e-3, start_epoch=2, cbs=[SaveModelCallback()])
    learn = learner(tmp_path / "ours")
    saver = SaveBestModelCallback()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(4, 2e-3, start_epoch=2, cbs=[saver])
    assert saver.last_saved_metadata["epoch"] in (2, 3)


# W&B, offline, read back with the CLI.


@pytest.fixture
def wandb_run(tmp_path, monkeypatch):
    import wandb

    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        path = tmp_path / var.lower()
        path.mkdir()
        monkeypatch.setenv(var, str(path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    # mode is passed too: wandb keeps the settings of its first setup() in this process, so an
    # earlier test's wandb use would otherwise make the environment variable go unread.
    run = wandb.init(project="fastai-callbacks", dir=str(tmp_path / "wandb_dir"), mode="offline",
                     settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))
    yield run
    run.finish()


def inspect(run_dir: str, *flags: str) -> str:
    proc = subprocess.run([WANDB_CLI, "leet", "inspect", "--json", *flags, run_dir],
                          capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout


def read_back(run) -> tuple[list[dict], list[dict], dict]:
    """(history items, artifacts, final summary) of a finished offline run."""
    run_dir = str(Path(run.dir).parent)
    history, artifacts = [], []
    for line in inspect(run_dir).splitlines():  # one JSON record per line
        record = json.loads(line)
        if record.get("type") == "history":
            history.append(record["history"]["item"])
        elif record.get("type") == "artifact":
            artifact = record["artifact"]
            artifact["metadata"] = json.loads(artifact["metadata"])
            artifacts.append(artifact)
    return history, artifacts, json.loads(inspect(run_dir, "--summary"))["summary"]


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_wandb_logs_the_best_epochs_model_and_metadata(tmp_path, wandb_run):
    learn = learner(tmp_path)
    saver = SaveBestModelCallback()
    fit(learn, 8, [saver, WandbBestModelCallback()])
    wandb_run.finish()
    history, artifacts, summary = read_back(wandb_run)

    losses = valid_losses(learn)
    best = losses.index(min(losses))
    assert 0 < best < 7, f"the monitored metric must peak in the middle: {losses}"
    assert [h["epoch"] for h in history] == list(range(8))
    assert [h["valid_loss"] for h in history] == pytest.approx(losses)

    (artifact,) = artifacts
    assert artifact["type"] == "model" and artifact["name"] == "model"
    assert sorted(artifact["aliases"]) == sorted(["best", f"epoch-{best}", "latest"])
    metadata = artifact["metadata"]
    assert metadata == saver.last_saved_metadata and metadata["epoch"] == best
    for key in METRICS:
        assert isinstance(metadata[key], float) and metadata[key] == recorder_row(learn, best)[key]
    files = {c["path"]: c for c in artifact["manifest"]["contents"]}
    assert files["model.pth"]["digest"] == md5_b64(tmp_path / "models/model.pth")
    assert files["model.json"]["digest"] == md5_b64(tmp_path / "models/model.json")

    assert summary["best_epoch"] == best
    for key in METRICS:
        assert summary[f"best_{key}"] == metadata[key]


def test_wandb_at_end_uploads_the_file_on_disk(tmp_path, wandb_run):
    learn = learner(tmp_path)
    saver = SaveBestModelCallback(at_end=True)
    fit(learn, 6, [saver, WandbBestModelCallback()])
    wandb_run.finish()
    _, (artifact,), summary = read_back(wandb_run)
    # The final model (what is on disk), documented as the final epoch, not labelled best...
    assert artifact["metadata"]["epoch"] == 5 and artifact["metadata"]["saved_because"] == "at_end"
    assert sorted(artifact["aliases"]) == ["epoch-5", "latest"]
    files = {c["path"]: c for c in artifact["manifest"]["contents"]}
    assert files["model.pth"]["digest"] == md5_b64(tmp_path / "models/model.pth")
    # ...while the summary's best_* are the best epoch's.
    best = saver.best_metadata
    assert best["epoch"] < 5 and summary["best_epoch"] == best["epoch"]
    assert summary["best_valid_loss"] == best["valid_loss"]


def test_wandb_callback_alone_adds_a_saver_for_the_fit(tmp_path, wandb_run):
    learn = learner(tmp_path)
    fit(learn, 4, [WandbBestModelCallback()])
    wandb_run.finish()
    _, (artifact,), _ = read_back(wandb_run)
    assert "best" in artifact["aliases"] and (tmp_path / "models/model.pth").exists()
    assert not any(isinstance(cb, SaveBestModelCallback) for cb in learn.cbs)
