"""``checkpoint.average_top_k`` end to end on 2 Ray Train workers (DDP), W&B offline, in its
two outcomes.

Won (``average_top_k: 3``, BatchNorm): at the run's end the three best models are averaged,
BatchNorm recomputed on the training split, the average scored on the whole validation split
and compared with the single best. The record is re-scored here in one process: the single
best's value and the average's (from the written checkpoint, and recomputed from the three)
each equal it to 1e-6; the average is ``best_checkpoint``, the test split was scored with it,
``load_best`` loads it, ``load_best(rank=1)`` the single best, and W&B holds it as a version
of the run's model with ``best`` (moved from the single best, now ``top-1``).

Lost (``average_top_k: 2``, a learning rate that leaves the two best far apart): the average
is worse, nothing is written, the single best stays ``best_checkpoint`` everywhere (the test
split, ``load_best``, W&B's ``best``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.api import load_best
from orchestrator.results.checkpoints import verify_checkpoint
from orchestrator.training.driver import run_training
from tests.integration.conftest import assert_close, overfit_config
from tests.integration.test_wandb import artifacts, run_summary
from tests.integration.test_wandb import wandb_env as wandb_env  # a fixture, re-exported
from workers.checkpoint.load import load_metadata
from workers.loop.averaging import averaged_workload
from workers.loop.scoring import evaluate_split, evaluate_workload

pytestmark = pytest.mark.integration


def rescored_average(cfg, summary) -> tuple[float, float]:
    """(the single best's val_loss, the average's), each computed here in one process."""
    averaged, ranked = summary["averaged"], summary["best_checkpoints"]
    assert averaged["averaged_from"] == [r["path"] for r in ranked[:averaged["k"]]]
    best_value = evaluate_split(cfg, ranked[0]["path"], "val")["val_loss"]
    assert_close(averaged["best_value"], best_value)
    workload, _ = averaged_workload(cfg, averaged["averaged_from"], torch.device("cpu"))
    value = evaluate_workload(cfg, workload, "val")["val_loss"]
    assert_close(averaged["value"], value)
    assert_close(averaged["by"], best_value - value)
    return best_value, value


def wandb_holders(summary) -> dict[str, dict]:
    """Each alias' version in the offline W&B run: W&B moves an alias to the newest version
    logged with it."""
    logged = artifacts(summary["wandb"]["run"])
    assert logged and all(a["name"] == f"{summary['name']}-model" for a in logged)
    return {alias: a for a in logged for alias in a["aliases"]}


def test_the_average_of_the_three_best_wins_and_is_the_best_model_everywhere(wandb_env,
                                                                            ray_local):
    cfg = overfit_config(wandb_env, "avg", test_split=True,
                         workload={"params": {"n_val": 97, "norm": True}},
                         train={"epochs": 8, "lr": 0.005},
                         checkpoint={"keep_top_k": 3, "average_top_k": 3},
                         wandb={"mode": "offline"})
    summary = run_training(cfg)
    averaged, ranked = summary["averaged"], summary["best_checkpoints"]
    assert averaged["batch_norm_recomputed"] is True
    best_value, value = rescored_average(cfg, summary)
    assert averaged["won"] is True and value < best_value

    target = Path(cfg.storage_path) / "avg" / "averaged_top_3"
    assert summary["best_checkpoint"] == averaged["path"] == str(target)
    assert verify_checkpoint(str(target)) is None
    assert load_metadata(target)["weights"] == "averaged"
    assert_close(evaluate_split(cfg, target, "val")["val_loss"], value)
    assert_close(summary["test_metrics"]["test_loss"],
                 evaluate_split(cfg, target, "test")["test_loss"])
    # best_checkpoints: the three single models; load_best: the average, rank 1 the single
    assert [r["rank"] for r in ranked] == [1, 2, 3]
    assert load_best(summary["run_dir"]).metadata["weights"] == "averaged"
    assert load_best(summary["run_dir"], rank=1).checkpoint == ranked[0]["path"]

    # W&B: the average is a version with best (and its own alias), its metadata the record
    holder = wandb_holders(summary)
    best = holder["best"]
    assert holder["averaged-top-3"] is best and best["metadata"]["weights"] == "averaged"
    assert best["metadata"]["averaged"]["epochs"] == [r["epoch"] for r in ranked]
    assert best["metadata"]["averaged"]["value"] == averaged["value"]
    assert best["metadata"]["averaged"]["by"] == averaged["by"]
    for rank, single in enumerate(ranked, start=1):
        assert holder[f"top-{rank}"]["metadata"]["epoch"] == single["epoch"]
        assert "weights" not in holder[f"top-{rank}"]["metadata"]
    final = run_summary(summary["wandb"]["run"])
    assert final["best_weights"] == "averaged" and final["best_val_loss"] == averaged["value"]
    assert final["test_loss"] == summary["test_metrics"]["test_loss"]
    print(f"average_top_k 3: won value={value:.6f} best={best_value:.6f} "
          f"by={averaged['by']:+.6f}")


def test_an_average_worse_than_the_best_changes_nothing(wandb_env, ray_local):
    # Adam at lr 0.02 without BatchNorm: the best (epoch 2) and the second (epoch 3, already
    # overfitting) are far apart; their average scores between them.
    cfg = overfit_config(wandb_env, "avg-lost", test_split=True,
                         train={"epochs": 3, "lr": 0.02},
                         checkpoint={"keep_top_k": 2, "average_top_k": 2},
                         wandb={"mode": "offline"})
    summary = run_training(cfg)
    averaged, ranked = summary["averaged"], summary["best_checkpoints"]
    best_value, value = rescored_average(cfg, summary)
    assert averaged["won"] is False and value > best_value and averaged["by"] < 0
    assert averaged["batch_norm_recomputed"] is False and "path" not in averaged

    single = ranked[0]["path"]
    assert summary["best_checkpoint"] == single
    assert summary["best_epoch"] == ranked[0]["epoch"]
    assert not (Path(cfg.storage_path) / "avg-lost" / "averaged_top_2").exists()
    assert_close(summary["test_metrics"]["test_loss"],
                 evaluate_split(cfg, single, "test")["test_loss"])
    assert load_best(summary["run_dir"]).checkpoint == single

    holder = wandb_holders(summary)
    assert holder["best"]["metadata"]["epoch"] == ranked[0]["epoch"]
    assert holder["top-2"]["metadata"]["epoch"] == ranked[1]["epoch"]
    assert not {"top-1", "averaged-top-2"} & set(holder)
    assert "weights" not in holder["best"]["metadata"]
    print(f"average_top_k 2: lost value={value:.6f} best={best_value:.6f} "
          f"by={averaged['by']:+.6f}")
