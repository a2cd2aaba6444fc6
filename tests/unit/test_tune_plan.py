"""Planning a search without Ray: what a resume may change, and which trial is the best."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.errors import UserError
from orchestrator.search.plan import export_best, leaderboard, resumed_config
from orchestrator.search.runner import trial_resources
from orchestrator.training.one_process import trains_in_trial
from workers.contract.config import RunConfig


def config(**changes) -> RunConfig:
    data = {"name": "s", "workload": {"entrypoint": "workers.workloads.digits:build"},
            "tune": {"search_space": {"train.lr": {"choice": [0.1, 0.01]}}}}
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return RunConfig.model_validate(data)


def test_a_resume_keeps_the_saved_search_and_takes_only_settings_that_change_no_result():
    saved = config(train__epochs=3).to_dict()
    cfg = resumed_config(saved, config(train__epochs=3, tune__max_concurrent_trials=1,
                                       wandb__mode="disabled", storage_path="/elsewhere"))
    assert cfg.train.epochs == 3
    assert cfg.tune.max_concurrent_trials == 1 and cfg.wandb.mode == "disabled"
    assert cfg.storage_path == "/elsewhere"


@pytest.mark.parametrize(("change", "named"), [
    ({"train__epochs": 5}, "train.epochs"),
    ({"tune__search_space": {"train.lr": {"choice": [0.5]}}}, "tune.search_space.train.lr"),
    ({"workload__params": {"hidden": 8}}, "workload.params.hidden"),
    ({"tune__num_samples": 9}, "tune.num_samples"),
])
def test_a_resume_with_a_changed_result_setting_is_refused_naming_it(change, named):
    saved = config().to_dict()
    with pytest.raises(UserError, match=rf"^--resume: .*{named}") as raised:
        resumed_config(saved, config(**change))
    assert "\n" not in str(raised.value)


def _row(trial_id: str, checkpoint: str | None) -> dict:
    return {"trial_id": trial_id, "hyperparameters": {"train.lr": 0.1},
            "best_checkpoint": checkpoint}


def test_the_exported_best_is_row_zero_or_nothing(tmp_path: Path):
    source = tmp_path / "trials" / "t1" / "checkpoint_epoch0002_1"
    source.mkdir(parents=True)
    (source / "model.safetensors").write_bytes(b"weights")
    (source / "metadata.json").write_text(json.dumps({"epoch": 2}))
    # Row 0's best epoch has no saved model: no other trial's model may stand in for it.
    assert export_best([_row("t0", None), _row("t1", str(source))], str(tmp_path)) is None
    assert not (tmp_path / "best_model").exists()
    exported = Path(export_best([_row("t1", str(source))], str(tmp_path)))
    assert json.loads((exported / "metadata.json").read_text())["trial_id"] == "t1"
    assert (exported / "model.safetensors").read_bytes() == b"weights"


def test_the_exported_best_passes_the_check_orchestrator_best_makes(tmp_path: Path):
    """The exported copy holds the model's files, not the training state, and its metadata
    lists exactly them: `orchestrator best` on the search verifies what is there."""
    from orchestrator.results.checkpoints import verify_checkpoint
    from workers.checkpoint.integrity import file_digest

    source = tmp_path / "trials" / "t1" / "checkpoint_epoch0002_1"
    source.mkdir(parents=True)
    files = {"model.safetensors": b"weights", "train_state.pt": b"optimizer and tracker"}
    for name, data in files.items():
        (source / name).write_bytes(data)
    (source / "metadata.json").write_text(json.dumps(
        {"epoch": 2, "files": {name: file_digest(data) for name, data in files.items()}}))
    assert verify_checkpoint(str(source)) is None
    exported = Path(export_best([_row("t1", str(source))], str(tmp_path)))
    assert sorted(p.name for p in exported.iterdir()) == ["metadata.json", "model.safetensors"]
    assert verify_checkpoint(str(exported)) is None
    (exported / "model.safetensors").write_bytes(b"weightz")  # and damage is still seen
    assert verify_checkpoint(str(exported)) == "model.safetensors does not match its sha256"


@pytest.mark.parametrize(("changes", "use_gpu", "ray_datasets", "in_trial"), [
    ({"scaling__num_workers": 1}, False, False, True),
    ({"scaling__num_workers": 2}, False, False, False),  # DDP: a Ray Train run
    ({"scaling__num_workers": [1, 2]}, False, False, False),  # elastic: Ray Train's
    ({"scaling__num_workers": 1}, True, False, False),  # a GPU trial stays a Ray Train run
    ({"scaling__num_workers": 1}, False, True, False),  # Ray Train shards the Ray Datasets
    ({"scaling__num_workers": 1, "tune__one_worker_trials": "ray_train"}, False, False, False),
])
def test_which_trials_train_in_their_tune_trials_own_process(changes, use_gpu, ray_datasets,
                                                             in_trial):
    cfg = config(**changes)
    assert trains_in_trial(cfg, use_gpu, ray_datasets) is in_trial
    # Its process takes the worker's CPUs; a Ray Train trial's process takes none.
    assert trial_resources(cfg, in_trial) == (
        {"cpu": cfg.scaling.cpus_per_worker} if in_trial else {"cpu": 0, "memory": 1 << 20})


def test_a_resume_may_change_where_one_worker_trials_train():
    saved = config(scaling__num_workers=1).to_dict()
    cfg = resumed_config(saved, config(scaling__num_workers=1,
                                       tune__one_worker_trials="ray_train"))
    assert cfg.tune.one_worker_trials == "ray_train"


def test_a_trial_whose_average_won_ranks_by_the_average_it_exports():
    """checkpoint.average_top_k: a trial's best model is its average where the average won;
    the leaderboard ranks and shows that model's value, so row 0 is the model exported."""
    def summary(trial_id: str, single: float, averaged: dict | None) -> dict:
        return {"trial_id": trial_id, "hyperparameters": {}, "status": "completed",
                "best_epoch": 3, "epochs_completed": 5, "best_metrics": {"val_loss": single},
                "best_checkpoint": f"/runs/{trial_id}/best", "test_metrics": None,
                **({"averaged": averaged} if averaged is not None else {})}

    board = leaderboard([
        summary("trial-000", 0.30, None),
        summary("trial-001", 0.32, {"won": True, "value": 0.28, "best_value": 0.32}),
        summary("trial-002", 0.29, {"won": False, "value": 0.31, "best_value": 0.29}),
    ], "val_loss", "min")
    assert [(r["trial_id"], r["best_val_loss"], r["best_is_average"]) for r in board] == [
        ("trial-001", 0.28, True), ("trial-002", 0.29, False), ("trial-000", 0.30, False)]
    assert board[0]["best_metrics"] == {"val_loss": 0.32}  # the single best it beat
