"""W&B decisions that need no W&B run: which models to log, the mode, the summary keys."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.tracking.mode import wandb_mode
from orchestrator.tracking.rules import artifact_name, best_summary, should_log_model

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("log_model", "saved_because", "is_best", "expected"),
    [
        ("policy", "best", True, True),
        ("policy", "every_n", False, True),
        ("policy", "all", True, True),
        ("policy", "last", False, True),
        ("policy", "resume", False, False),  # fault-tolerance copies are not the policy's
        ("best", "all", False, False),
        ("best", "all", True, True),
        ("best", "resume", True, True),
        ("none", "best", True, False),
    ],
)
def test_should_log_model(log_model, saved_because, is_best, expected):
    assert should_log_model(log_model, saved_because, is_best) is expected


def test_auto_mode_follows_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled" and wandb_mode("offline") == "offline"


def test_best_summary_keys_come_from_one_record():
    best = {"epoch": 4, "train_loss": 0.3, "val_loss": 0.4, "val_mcc": 0.8, "monitor": "val_loss",
            "mode": "min", "is_best": True, "seed": 0, "world_size": 2}
    out = best_summary(best, {"test_loss": 0.5, "test_mcc": 0.7})
    assert out == {"best_epoch": 4, "best_train_loss": 0.3, "best_val_loss": 0.4,
                   "best_val_mcc": 0.8, "test_loss": 0.5, "test_mcc": 0.7}


def test_artifact_name_is_valid():
    assert artifact_name("my run/1") == "my-run-1-model"


def test_disabled_imports_nothing_from_wandb():
    code = (
        "import sys\n"
        "from workers.contract.config import RunConfig\n"
        "from orchestrator.tracking.wandb_run import open_run, NullRun\n"
        "cfg = RunConfig.model_validate({'workload': {'entrypoint': 'a:b'},"
        " 'wandb': {'mode': 'disabled'}})\n"
        "assert isinstance(open_run(cfg, '/nonexistent'), NullRun)\n"
        "assert not any(m == 'wandb' or m.startswith('wandb.') for m in sys.modules), 'wandb'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def ckpt(epoch: int, is_best: bool, saved_because: str = "all") -> dict:
    return {"epoch": epoch, "path": f"/runs/r/checkpoint_epoch{epoch:04d}", "is_best": is_best,
            "metadata": {"epoch": epoch, "is_best": is_best, "saved_because": saved_because}}


# Five improvements (1, 2, 3, 5, 8) in 10 epochs, every epoch saved (policy all).
ALL_TEN = [ckpt(e, e in (1, 2, 3, 5, 8)) for e in range(1, 11)]
BEST = ALL_TEN[7]["path"]


@pytest.mark.parametrize(
    ("log_model", "keep", "checkpoints", "expected"),
    [
        ("policy", "best_and_last", ALL_TEN,
         [(8, ["epoch-8", "best"]), (10, ["epoch-10", "last"])]),
        ("policy", "best", ALL_TEN, [(8, ["epoch-8", "best"])]),
        ("best", "best_and_last", ALL_TEN, [(8, ["epoch-8", "last", "best"])]),  # one version
        ("end", "best_and_last", ALL_TEN, [(8, ["epoch-8", "best"]), (10, ["epoch-10", "last"])]),
        ("end", "all", ALL_TEN, [(8, ["epoch-8", "best"]), (10, ["epoch-10", "last"])]),
        # A resume-only checkpoint is never the last model.
        ("policy", "best_and_last", [*ALL_TEN[:8], ckpt(9, False, "resume")],
         [(8, ["epoch-8", "last", "best"])]),
        ("none", "best_and_last", [], []),
    ],
)
def test_the_models_kept_at_the_end(log_model, keep, checkpoints, expected):
    from orchestrator.tracking.rules import kept_at_end

    kept = kept_at_end(log_model, keep, BEST if checkpoints else None, checkpoints)
    assert [(int(m["epoch"]), aliases) for _, m, aliases in kept] == expected


class RecordedApi:
    """What W&B's public API does with the calls the pruner makes (``Api.artifact(name,
    type=...)`` then ``Artifact.delete(delete_aliases=True)``), recorded: no server here."""

    def __init__(self) -> None:
        self.deleted: list[str] = []

    def artifact(self, name: str, type: str | None = None):
        assert type == "model" and name.startswith("team/proj/run-model:v")
        api = self

        class Version:
            def delete(self, delete_aliases: bool = False) -> bool:
                assert delete_aliases  # a superseded version may still hold epoch-N
                api.deleted.append(name)
                return True

        return Version()


class Logged:
    """An artifact as ``run.log_artifact`` returns it online: ``wait`` until committed, then
    its qualified name carries the version."""

    def __init__(self, version: int) -> None:
        self.version, self.waited = version, False

    def wait(self):
        self.waited = True
        return self

    @property
    def qualified_name(self) -> str:
        assert self.waited, "the version is known only once committed"
        return f"team/proj/run-model:v{self.version}"


@pytest.mark.parametrize(
    ("keep", "left"),
    [("best_and_last", ["v7", "v9"]), ("best", ["v7"])],
)
def test_online_superseded_versions_are_deleted_once_a_newer_one_is_committed(keep, left):
    from orchestrator.tracking.pruner import VersionPruner

    api = RecordedApi()
    pruner = VersionPruner(keep, api)
    # Epochs 1..10 logged as versions v0..v9 (policy all); improvements in 1, 2, 3, 5 and 8.
    most_held = 0
    for version in range(10):
        pruner.committed(Logged(version), is_best=version + 1 in (1, 2, 3, 5, 8))
        most_held = max(most_held, len(pruner.versions))
    assert [name.rsplit(":", 1)[1] for name, _ in pruner.versions] == left
    assert sorted(api.deleted + [f"team/proj/run-model:{v}" for v in left]) == sorted(
        f"team/proj/run-model:v{v}" for v in range(10))
    assert most_held <= 2  # at any time, at most the kept versions


def test_a_moved_alias_is_no_new_version_and_deletes_nothing():
    from orchestrator.tracking.pruner import VersionPruner

    api = RecordedApi()
    pruner = VersionPruner("best_and_last", api)
    for version, is_best in ((0, True), (1, False)):
        pruner.committed(Logged(version), is_best=is_best)
    pruner.committed(Logged(0), is_best=True)  # `best` moved onto v0 at the end: same files
    assert [n for n, _ in pruner.versions] == ["team/proj/run-model:v0", "team/proj/run-model:v1"]
    assert api.deleted == []


def test_the_calls_the_pruner_makes_exist_in_wandbs_public_api():
    """The recorded API above has the real one's shape (no server here to call it)."""
    import inspect

    import wandb
    from wandb.sdk.artifacts.artifact import Artifact

    assert list(inspect.signature(wandb.Api.artifact).parameters) == ["self", "name", "type"]
    assert "delete_aliases" in inspect.signature(Artifact.delete).parameters
    assert "timeout" in inspect.signature(Artifact.wait).parameters
    assert isinstance(Artifact.qualified_name, property)


def step_ckpt(epoch: int, global_step: int, is_best: bool, saved_because: str = "best") -> dict:
    metadata = {"epoch": epoch, "step": global_step % 6 or 6, "global_step": global_step,
                "is_best": is_best, "saved_because": saved_because}
    return {"epoch": epoch, "path": f"/runs/r/checkpoint_step{global_step:08d}",
            "is_best": is_best, "metadata": metadata}


def test_a_run_that_evaluates_by_steps_names_its_versions_by_global_step():
    """Two evaluations in epoch 2 (steps 8 and 10): the versions are step-8 and step-10, in
    the order of the run; a checkpoint a signal had saved is never a model to log."""
    from orchestrator.tracking.rules import kept_at_end, version_alias

    checkpoints = [step_ckpt(2, 8, True), step_ckpt(2, 10, False, "every_n"),
                   step_ckpt(2, 11, False, "preempt")]
    kept = kept_at_end("policy", "best_and_last", checkpoints[0]["path"], checkpoints,
                       by_steps=True)
    assert [(m["global_step"], aliases) for _, m, aliases in kept] == [
        (8, ["step-8", "best"]), (10, ["step-10", "last"])]
    assert version_alias(checkpoints[0]["metadata"], by_steps=False) == "epoch-2"
    assert not should_log_model("policy", "preempt", False)
    best = best_summary({**checkpoints[0]["metadata"], "val_loss": 0.5}, None)
    assert (best["best_epoch"], best["best_step"], best["best_global_step"]) == (2, 2, 8)
