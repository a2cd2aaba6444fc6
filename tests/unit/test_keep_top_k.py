"""``checkpoint.keep_top_k``: the tracker's K best, the policy's saves, Ray's retention, the
summary's order, the best table, ``load_best(rank=k)``'s choice and W&B's aliases agree."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.api import ranked_checkpoint
from orchestrator.cli.tables import best_checkpoints_table, make_console, print_summary
from orchestrator.errors import UserError
from orchestrator.results.checkpoints import kept_checkpoints, top_k_checkpoints
from orchestrator.tracking.pruner import VersionPruner
from orchestrator.tracking.rules import kept_at_end, rank_aliases
from workers.checkpoint.policy import (
    BELOW_TOP_K,
    decide_save,
    ray_keep_settings,
    top_k_score,
)
from workers.contract.config import RunConfig
from workers.decisions.top_k import TopK
from workers.decisions.tracker import BestTracker


def ray_keeps(reports: list[tuple[str, float]], num_to_keep: int) -> list[str]:
    """Ray Train 2.60's retention (train/_internal/checkpoint_manager.py and v2's
    ``_save_state_and_delete_old_checkpoints``): checkpoints sorted by score, ascending, an
    equal score placing the later report above; after each registration all but the top
    ``num_to_keep`` are deleted, except the latest."""
    held: list[tuple[float, int, str]] = []
    for index, (name, score) in enumerate(reports):
        held.append((score, index, name))
        held.sort()
        drop = set(held[:-num_to_keep]) - {held_item for held_item in held if held_item[1] == index}
        held = [h for h in held if h not in drop]
    return [name for _, _, name in held]


def run_tracker(values: list[float], k: int, mode: str = "min",
                resume_at: set[int] = frozenset(), **kwargs) -> tuple[BestTracker, list]:
    """Each evaluation through the tracker and the policy, as rank 0's manager does: the
    checkpoints reported (name, Ray score), and the tracker."""
    tracker = BestTracker("val_loss", mode, top_k=k, **kwargs)
    reports = []
    for epoch, value in enumerate(values, start=1):
        decision = tracker.update(epoch, {"val_loss": value})
        verdict = decide_save("best", epoch, improved=decision.improved, is_final=False,
                              resume_every_n_epochs=1 if epoch in resume_at else 0,
                              top_k_rank=decision.top_k_rank)
        if verdict.save:
            reports.append((f"e{epoch}", top_k_score(decision.value, tracker.mode,
                                                     verdict.top_k_rank is not None)))
    return tracker, reports


def test_an_evaluation_enters_when_strictly_better_than_the_kth_nan_and_ties_never():
    top = TopK(3, "min")
    assert [top.add(v, e) for e, v in enumerate([5.0, 4.0, math.nan, 6.0, 6.0, 3.0, 6.0,
                                                  math.inf, 4.0, 4.0], start=1)] == [
        1, 1, None, 3, None, 1, None, None, 3, None]
    # 6.0 (epoch 4) went when 3.0 entered, 5.0 when 4.0 came again (after its equal: third);
    # a third 4.0 ties the third best: it does not enter.
    assert [(e["value"], e["epoch"]) for e in top.entries] == [(3.0, 6), (4.0, 2), (4.0, 9)]
    top = TopK(2, "max")
    assert [top.add(v, e) for e, v in enumerate([0.5, 0.7, 0.6, 0.9], start=1)] == [
        1, 1, 2, 1]
    assert [e["epoch"] for e in top.entries] == [4, 2]


def test_equal_values_rank_the_earlier_first_and_leave_the_earlier_first():
    top = TopK(2, "min")
    assert [top.add(3.0, 1), top.add(3.0, 2)] == [1, 2]  # the set was not full
    assert top.add(2.0, 3) == 1
    # Of the two equal worst, Ray drops the earlier report: so does TopK.
    assert [(e["value"], e["epoch"]) for e in top.entries] == [(2.0, 3), (3.0, 2)]


def test_the_tracker_offers_each_evaluation_and_its_state_round_trips():
    tracker, _ = run_tracker([5.0, 4.0, 6.0, 3.0, 4.5], k=3)
    assert [(e["value"], e["epoch"]) for e in tracker.state_dict()["top_k"]] == [
        (3.0, 4), (4.0, 2), (4.5, 5)]
    again = BestTracker("val_loss", "min", top_k=3)
    again.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert again.top_k.entries == tracker.top_k.entries
    assert again.update(6, {"val_loss": 4.2}).top_k_rank == 3
    assert again.update(7, {"val_loss": 4.6}).top_k_rank is None


def test_k_1_is_todays_tracker_and_an_old_state_loads():
    one, _ = run_tracker([5.0, 4.0, 6.0], k=1)
    assert "top_k" not in one.state_dict()  # train_state.pt as it was
    assert one.update(4, {"val_loss": 3.0}).top_k_rank is None
    old = one.state_dict()
    resumed = BestTracker("val_loss", "min", top_k=3)
    resumed.load_state_dict(old)  # saved with K = 1: its best is all it knows
    assert [(e["value"], e["epoch"]) for e in resumed.top_k.entries] == [(3.0, 4)]
    # A smaller K on a resume keeps the best of what was saved.
    three, _ = run_tracker([5.0, 4.0, 3.0], k=3)
    two = BestTracker("val_loss", "min", top_k=2)
    two.load_state_dict(three.state_dict())
    assert [e["epoch"] for e in two.top_k.entries] == [3, 2]


def test_initial_best_and_smoothing_decide_the_top_k_too():
    tracker, reports = run_tracker([5.0, 3.5, 4.5, 3.0], k=3, initial_best=4.0)
    assert [e["epoch"] for e in tracker.top_k.entries] == [4, 2]
    assert [name for name, _ in reports] == ["e2", "e4"]
    smoothed = BestTracker("val_loss", "min", top_k=2, smoothing={"ema": 0.5})
    for epoch, v in enumerate([4.0, 2.0, 6.0], start=1):
        smoothed.update(epoch, {"val_loss": v})
    assert [(e["value"], e["epoch"]) for e in smoothed.top_k.entries] == [(3.0, 2), (4.0, 1)]


def test_the_policy_saves_the_entrants_with_their_rank():
    entered = decide_save("best", 4, improved=False, is_final=False, top_k_rank=2)
    assert (entered.save, entered.reason, entered.top_k_rank) == (True, "best", 2)
    both = decide_save("best", 4, improved=True, is_final=False, resume_every_n_epochs=2,
                       top_k_rank=1)
    assert (both.reason, both.full_state, both.top_k_rank) == ("best", True, 1)
    resume = decide_save("best", 4, improved=False, is_final=False, resume_every_n_epochs=2)
    assert (resume.reason, resume.top_k_rank) == ("resume", None)
    assert decide_save("best", 3, improved=True, is_final=False) == decide_save(
        "best", 3, improved=True, is_final=False, top_k_rank=None)  # K = 1: as today


def test_ray_keep_settings_and_scores():
    assert ray_keep_settings("best", "rank", 3) == {
        "num_to_keep": 3, "checkpoint_score_attribute": "rank", "checkpoint_score_order": "max"}
    assert ray_keep_settings("best", "rank")["num_to_keep"] == 1
    assert top_k_score(0.3, "min", True) == -0.3 and top_k_score(0.3, "max", True) == 0.3
    assert top_k_score(-1e300, "max", False) == BELOW_TOP_K < -1e300
    assert math.isfinite(BELOW_TOP_K)  # Ray's snapshot is JSON


@pytest.mark.parametrize("seed", range(40))
def test_ray_keeps_exactly_the_trackers_k_and_at_most_the_latest_resume(seed):
    rng = random.Random(seed)
    k = rng.choice([2, 3, 4])
    # Coarse values (ties are common, as with accuracy), NaN now and then.
    values = [rng.choice([math.nan] + [round(rng.uniform(0, 1), 1) for _ in range(9)])
              for _ in range(30)]
    resume_at = {e for e in range(1, 31) if rng.random() < 0.4}
    mode = rng.choice(["min", "max"])
    tracker, reports = run_tracker(values, k, mode, resume_at)
    kept = ray_keeps(reports, k)
    top = {f"e{e['epoch']}" for e in tracker.top_k.entries}
    extra = [name for name in kept if name not in top]
    assert top <= set(kept)
    if len(top) == k:  # once K have entered: the K and at most the latest checkpoint
        assert extra in ([], [reports[-1][0]]), (values, kept, top)


def kept_checkpoint(tmp_path: Path, epoch: int, value: float, rank: int | None,
                    reason: str = "best", is_best: bool = False) -> None:
    path = tmp_path / f"checkpoint_epoch{epoch:04d}_{epoch}"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"x")
    meta = {"epoch": epoch, "val_loss": value, "monitor": "val_loss", "mode": "min",
            "is_best": is_best, "saved_because": reason}
    if rank is not None:
        meta["top_k_rank"] = rank
    (path / "metadata.json").write_text(json.dumps(meta))


def test_the_summary_lists_the_kept_k_best_first(tmp_path):
    kept_checkpoint(tmp_path, 2, 0.5, 1, is_best=True)
    kept_checkpoint(tmp_path, 3, 0.4, 1, is_best=True)
    kept_checkpoint(tmp_path, 5, 0.45, 2)
    kept_checkpoint(tmp_path, 6, 0.9, None, reason="resume")
    ranked = top_k_checkpoints(kept_checkpoints(str(tmp_path)), 3, "min")
    assert [(c["rank"], c["epoch"], c["value"]) for c in ranked] == [
        (1, 3, 0.4), (2, 5, 0.45), (3, 2, 0.5)]
    assert ranked[0]["path"].endswith("checkpoint_epoch0003_3")
    # More than K left (a run stopped while Ray deleted one): the rule picks the K.
    assert [c["epoch"] for c in top_k_checkpoints(kept_checkpoints(str(tmp_path)), 2,
                                                  "min")] == [3, 5]


def summary_with(ranked: list[dict]) -> dict:
    return {"name": "r", "run_dir": "/runs/r", "monitor": "val_loss", "mode": "min",
            "policy": "best", "best_epoch": ranked[0]["epoch"], "epochs_completed": 9,
            "best_metrics": {"epoch": ranked[0]["epoch"], "val_loss": ranked[0]["value"]},
            "test_metrics": None, "best_checkpoint": ranked[0]["path"],
            "best_checkpoints": ranked, "config": {"checkpoint": {"keep_top_k": 3}}}


RANKED = [{"rank": r, "path": f"/runs/r/checkpoint_epoch000{e}_1", "epoch": e, "step": None,
           "global_step": None, "value": v, "is_best": r == 1}
          for r, (e, v) in enumerate([(4, 0.31), (3, 0.35), (6, 0.375)], start=1)]


def test_the_best_table_lists_the_k(capsys):
    table = best_checkpoints_table(summary_with(RANKED))
    assert [c.header for c in table.columns] == ["rank", "epoch", "val_loss", "checkpoint"]
    print_summary(summary_with(RANKED), make_console())
    out = capsys.readouterr().out
    assert "the 3 best models kept" in out and "checkpoint_epoch0006_1" in out
    assert "0.375" in out


def test_load_best_takes_a_rank_and_refuses_one_out_of_range():
    record = summary_with(RANKED)
    assert ranked_checkpoint(record, 2, "s.json") == RANKED[1]["path"]
    with pytest.raises(UserError, match=r"rank 4 is out of range; the ranks are 1 to 3 "
                                        r"\(checkpoint.keep_top_k: 3\)"):
        ranked_checkpoint(record, 4, "s.json")
    with pytest.raises(UserError, match="rank 2 is out of range; rank 1 is its only"):
        ranked_checkpoint({"best_checkpoint": "/a"}, 2, "s.json")


def test_wandb_aliases_follow_the_final_ranks():
    assert rank_aliases(["a", "b", "c"]) == {"a": "best", "b": "top-2", "c": "top-3"}
    kept = [{"epoch": e, "path": f"p{e}", "is_best": False,
             "metadata": {"epoch": e, "saved_because": reason}}
            for e, reason in [(3, "best"), (4, "best"), (6, "best"), (7, "resume")]]
    logged = kept_at_end("policy", "best_and_last", "p4", kept, ranked=["p4", "p3", "p6"])
    assert [(path, aliases) for path, _, aliases in logged] == [
        ("p3", ["epoch-3", "top-2"]), ("p4", ["epoch-4", "best"]),
        ("p6", ["epoch-6", "last", "top-3"])]
    only = kept_at_end("policy", "best", "p4", kept, ranked=["p4", "p3", "p6"])
    assert [aliases[-1] for _, _, aliases in only] == ["top-2", "best", "top-3"]
    # checkpoint.average_top_k's average won: it takes best (logged apart), the K their ranks
    assert rank_aliases(["a", "b"], average_won=True) == {"a": "top-1", "b": "top-2"}
    won = kept_at_end("policy", "best", "avg", kept, ranked=["p4", "p3", "p6"],
                      average_won=True)
    assert [aliases for _, _, aliases in won] == [
        ["epoch-3", "top-2"], ["epoch-4", "top-1"], ["epoch-6", "top-3"]]


class Logged:
    def __init__(self, version: int) -> None:
        self.qualified_name = f"e/p/m:v{version}"

    def wait(self) -> None:
        pass


class Api:
    def __init__(self) -> None:
        self.deleted: list[str] = []

    def artifact(self, name: str, type: str) -> Api:
        self.deleted.append(name)
        return self

    def delete(self, delete_aliases: bool) -> None:
        pass


@pytest.mark.parametrize("keep", ["best", "best_and_last"])
def test_online_versions_that_leave_the_k_are_deleted(keep):
    api = Api()
    pruner = VersionPruner(keep, api, top_k=2)
    for v, (epoch, value) in enumerate([(1, 0.5), (2, 0.4), (3, 0.45), (5, 0.3)]):
        pruner.committed(Logged(v), value < 0.45 or epoch == 1,
                         {"epoch": epoch, "val_loss": value, "monitor": "val_loss",
                          "mode": "min", "top_k_rank": 1})
    # 0.45 (v2) evicted 0.5 (v0); 0.3 (v3) evicted 0.45 (v2): the K left are v1 and v3.
    assert api.deleted == ["e/p/m:v0", "e/p/m:v2"]
    assert [n for n, _ in pruner.versions] == ["e/p/m:v1", "e/p/m:v3"]


def test_keep_top_k_is_for_policy_best_only():
    base = {"workload": {"entrypoint": "m:f"}, "wandb": {"mode": "disabled"}}
    assert RunConfig.model_validate({**base, "checkpoint": {"keep_top_k": 3}}
                                    ).checkpoint.keep_top_k == 3
    with pytest.raises(ValidationError, match="checkpoint.keep_top_k: only checkpoint.policy "
                                              "best uses it"):
        RunConfig.model_validate({**base, "checkpoint": {"keep_top_k": 3, "policy": "all"}})
    with pytest.raises(ValidationError):
        RunConfig.model_validate({**base, "checkpoint": {"keep_top_k": 0}})
