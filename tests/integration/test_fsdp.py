"""``scaling.strategy: fsdp`` on real gloo processes under Ray Train: every rank holds a shard
of the model and of its optimizer state; the whole model is gathered to rank 0 when, and only
when, rank 0's tracker saves it, and the file written is a plain model's, as under DDP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.errors import UserError
from orchestrator.training.driver import run_training
from tests.integration.conftest import assert_close, overfit_config
from tests.workloads.overfit import build as build_overfit
from workers.loop.scoring import evaluate_split

pytestmark = pytest.mark.integration

# 97 validation samples on 2 ranks, batches of 8: 49 and 48 samples, 7 and 6 batches, so the
# rank with fewer makes a padding forward (FSDP's forward is a collective); BatchNorm buffers
# and dropout, as in real models.
PARAMS = {"n_val": 97, "norm": True, "dropout": 0.1}


def fsdp_config(tmp_path: Path, name: str, workers: int = 2, test_split: bool = False,
                **sections):
    sections.setdefault("workload", {"params": PARAMS})
    sections["scaling"] = {"num_workers": workers, "cpus_per_worker": 2 / workers,
                           "strategy": "fsdp", **sections.get("scaling", {})}
    return overfit_config(tmp_path, name=name, test_split=test_split, **sections)


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, ray_local):
    """One undisturbed 8-epoch fsdp run: checked as it is, and the reference the restarted run
    must follow (the schedule is constant and each epoch seeded: its first 6 epochs are what
    a 6-epoch run trains)."""
    cfg = fsdp_config(tmp_path_factory.mktemp("fsdp"), "fsdp", test_split=True,
                      train={"epochs": 8})
    return cfg, run_training(cfg)


def test_fsdp_gathers_only_to_save_and_its_best_model_reproduces_its_metrics(undisturbed,
                                                                             tmp_path):
    cfg, summary = undisturbed
    history = summary["history"]
    losses = [h["val_loss"] for h in history]
    best_epoch = losses.index(min(losses)) + 1
    assert summary["best_epoch"] == best_epoch and 1 < best_epoch < 8  # peaks mid-run

    # One gather per improvement (the `best` policy saves nothing else), none otherwise.
    improved = [h["epoch"] for h in history if h["is_best"]]
    assert len(improved) >= 2
    assert [h["epoch"] for h in history if "gather_seconds" in h] == improved

    # The saved file is a plain model's: every tensor of the workload's model, whole.
    best = Path(summary["best_checkpoint"])
    saved = load_file(best / "model.safetensors")
    plain = build_overfit(**PARAMS).model.state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        k: tuple(v.shape) for k, v in plain.items()}
    # Loaded into the plain model in one process, it scores what the run recorded.
    for split, recorded in (("val", summary["best_metrics"]), ("test", summary["test_metrics"])):
        recomputed = evaluate_split(cfg, best, split)
        assert recomputed, split
        for key, value in recomputed.items():
            assert_close(value, recorded[key])

    # A wrapping class the model does not have: one line, a user error (never retried).
    wrong = fsdp_config(tmp_path, "wrong", train={"epochs": 2},
                        scaling={"fsdp_blocks": ["TransformerBlock"]})
    with pytest.raises(UserError, match=r"^scaling\.fsdp_blocks: TransformerBlock not in the "
                                        r"model; its module classes: .*Linear"):
        run_training(wrong)


def test_fsdp_restarts_after_a_killed_worker_and_resumes_on_more_workers(undisturbed,
                                                                          tmp_path):
    common = {"train": {"epochs": 6}, "checkpoint": {"resume_every_n_epochs": 1}}
    reference = undisturbed[1]["history"][:6]
    reference_losses = [h["val_loss"] for h in reference]

    marker = tmp_path / "killed-once"
    # 16 training samples per rank, batch 8: 2 steps an epoch; a rank SIGKILLs itself in
    # epoch 3. Resume checkpoints hold the gathered optimizer state: the restart continues
    # exactly where the undisturbed run went.
    params = {**PARAMS, "fail_after_steps": 5, "fail_with": "sigkill", "marker": str(marker)}
    cfg = fsdp_config(tmp_path, "restarted", workload={"params": params},
                      failure={"max_failures": 1}, **common)
    summary = run_training(cfg)
    assert marker.exists(), "the kill did not happen"
    assert summary["best_epoch"] == reference_losses.index(min(reference_losses)) + 1
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 7))
    for got, ref in zip(summary["history"], reference, strict=True):
        assert_close(got["val_loss"], ref["val_loss"], rel=1e-5)
        assert got["is_best"] == ref["is_best"]

    # The same run continued to epoch 9 on 3 workers: the whole optimizer state, saved from
    # 2 shards, is loaded into 3.
    more = run_training(fsdp_config(tmp_path, "restarted", workers=3,
                                    workload={"params": params},
                                    train={"epochs": 9}, checkpoint=common["checkpoint"]),
                        resume=True)
    assert [h["epoch"] for h in more["history"]] == list(range(1, 10))
    assert [h["workers"] for h in more["history"]] == [2] * 6 + [3] * 3
    assert more["history"][:6] == summary["history"]
    losses = [h["val_loss"] for h in more["history"]]
    assert more["best_epoch"] == losses.index(min(losses)) + 1
    recomputed = evaluate_split(fsdp_config(tmp_path, "restarted", workers=3, train={"epochs": 9}),
                                more["best_checkpoint"], "val")
    for key, value in recomputed.items():
        assert_close(value, more["best_metrics"][key])


def test_fsdp_bf16_trains_in_bfloat16_and_saves_float32_weights(tmp_path, ray_local):
    """bf16 under fsdp is FSDP's mixed-precision policy: bfloat16 compute and gathers, float32
    parameters and saved weights; BatchNorm layers keep float32 (their statistics are)."""
    cfg = fsdp_config(tmp_path, "bf16", train={"epochs": 3, "precision": "bf16"})
    summary = run_training(cfg)
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    saved = load_file(Path(summary["best_checkpoint"]) / "model.safetensors")
    assert {t.dtype for t in saved.values()} >= {torch.float32}
    assert all(t.dtype != torch.bfloat16 for t in saved.values())
    # The run computed in bfloat16 throughout (FSDP casts the parameters); a one-process
    # evaluation under autocast keeps some operations in float32: the two agree to bfloat16's
    # precision, not to float32's.
    recomputed = evaluate_split(cfg, summary["best_checkpoint"], "val")
    assert recomputed["val_loss"] == pytest.approx(summary["best_metrics"]["val_loss"], rel=2e-2)
