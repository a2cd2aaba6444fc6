"""``checkpoint.average_top_k: 3`` end to end on 2 Ray Train workers (DDP, BatchNorm): at the
run's end the three best models are averaged, BatchNorm recomputed on the training split, the
average scored on the whole validation split and compared with the single best. The record
is re-scored here in one process: the single best's value and the average's (from the
written checkpoint when it won, else recomputed from the three) each equal it to 1e-6, the
verdict follows from them, and the test split was scored with the winner. (The other outcome
of the comparison, on saved checkpoints without Ray: tests/unit/test_average_top_k.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.results.checkpoints import verify_checkpoint
from orchestrator.training.driver import run_training
from tests.integration.conftest import assert_close, overfit_config
from workers.checkpoint.load import load_metadata
from workers.loop.averaging import averaged_workload
from workers.loop.scoring import evaluate_split, evaluate_workload

pytestmark = pytest.mark.integration


def test_the_average_of_the_three_best_is_kept_only_if_it_wins(tmp_path, ray_local):
    cfg = overfit_config(tmp_path, "avg", test_split=True,
                         workload={"params": {"n_val": 97, "norm": True}},
                         train={"epochs": 8, "lr": 0.005},
                         checkpoint={"keep_top_k": 3, "average_top_k": 3})
    summary = run_training(cfg)
    averaged = summary["averaged"]
    ranked = summary["best_checkpoints"]
    assert averaged["averaged_from"] == [r["path"] for r in ranked]
    assert averaged["batch_norm_recomputed"] is True

    best_dir = ranked[0]["path"]
    best_value = evaluate_split(cfg, best_dir, "val")["val_loss"]
    assert_close(averaged["best_value"], best_value)

    workload, _ = averaged_workload(cfg, averaged["averaged_from"], torch.device("cpu"))
    value = evaluate_workload(cfg, workload, "val")["val_loss"]
    assert_close(averaged["value"], value)
    assert averaged["won"] is (value < best_value)
    assert_close(averaged["by"], best_value - value)

    winner = averaged["path"] if averaged["won"] else best_dir
    assert summary["best_checkpoint"] == winner
    assert_close(summary["test_metrics"]["test_loss"],
                 evaluate_split(cfg, winner, "test")["test_loss"])
    target = Path(cfg.storage_path) / "avg" / "averaged_top_3"
    assert target.exists() is averaged["won"]
    if averaged["won"]:
        assert verify_checkpoint(str(target)) is None
        assert load_metadata(target)["weights"] == "averaged"
        assert_close(evaluate_split(cfg, target, "val")["val_loss"], averaged["value"])
    print(f"average_top_k 3: won={averaged['won']} value={averaged['value']:.6f} "
          f"best={averaged['best_value']:.6f} by={averaged['by']:+.6f}")
