"""Checkpoint policy: which epochs save, why, and what Ray is told to keep."""

from __future__ import annotations

from dataclasses import replace

import pytest

from workers.checkpoint.policy import (
    PREEMPTION,
    SaveDecision,
    decide_save,
    rank_score,
    ray_keep_settings,
)

POLICIES = ["best", "every_n", "all", "last", "none"]


@pytest.mark.parametrize(
    ("policy", "epoch", "improved", "is_final", "every_n", "expected"),
    [
        # best: exactly the improving epochs
        ("best", 1, True, False, 1, SaveDecision(True, "best")),
        ("best", 2, False, False, 1, SaveDecision(False, "")),
        ("best", 5, False, True, 1, SaveDecision(False, "")),  # the last epoch is not special
        ("best", 5, True, True, 1, SaveDecision(True, "best")),
        # every_n: epochs divisible by N (numbered from 1), whatever the tracker says
        ("every_n", 1, True, False, 3, SaveDecision(False, "")),
        ("every_n", 2, False, False, 3, SaveDecision(False, "")),
        ("every_n", 3, False, False, 3, SaveDecision(True, "every_n")),
        ("every_n", 6, True, False, 3, SaveDecision(True, "every_n")),
        ("every_n", 7, False, True, 3, SaveDecision(False, "")),
        ("every_n", 1, False, False, 1, SaveDecision(True, "every_n")),
        ("every_n", 4, False, False, 2, SaveDecision(True, "every_n")),
        # all: every epoch
        ("all", 1, False, False, 1, SaveDecision(True, "all")),
        ("all", 2, True, False, 7, SaveDecision(True, "all")),
        ("all", 3, False, True, 1, SaveDecision(True, "all")),
        # last: only the final epoch (the configured end or an early stop)
        ("last", 1, True, False, 1, SaveDecision(False, "")),
        ("last", 9, False, False, 1, SaveDecision(False, "")),
        ("last", 10, False, True, 1, SaveDecision(True, "last")),
        ("last", 4, True, True, 1, SaveDecision(True, "last")),
        # none: never
        ("none", 1, True, False, 1, SaveDecision(False, "")),
        ("none", 10, True, True, 1, SaveDecision(False, "")),
    ],
)
def test_decide_save_without_resume_checkpoints(
    policy: str, epoch: int, improved: bool, is_final: bool, every_n: int, expected: SaveDecision
) -> None:
    # The verdict carries the tracker's: is_best, whether or not the policy saves.
    expected = replace(expected, improved=improved)
    assert (
        decide_save(policy, epoch, improved=improved, is_final=is_final, every_n_epochs=every_n)
        == expected
    )
    # resume_every_n_epochs=0 means off: the same answer when given explicitly
    assert (
        decide_save(
            policy, epoch, improved=improved, is_final=is_final, every_n_epochs=every_n,
            resume_every_n_epochs=0,
        )
        == expected
    )


@pytest.mark.parametrize(
    ("policy", "epoch", "improved", "is_final", "resume_n", "expected"),
    [
        # the policy's own reason wins when both apply; a resume epoch saves the full state
        ("best", 4, True, False, 2, SaveDecision(True, "best", full_state=True)),
        ("best", 4, False, False, 2, SaveDecision(True, "resume", full_state=True)),
        ("best", 3, False, False, 2, SaveDecision(False, "")),
        ("all", 4, False, False, 2, SaveDecision(True, "all", full_state=True)),
        ("all", 5, False, False, 2, SaveDecision(True, "all")),
        ("last", 4, False, False, 2, SaveDecision(True, "resume", full_state=True)),
        ("last", 4, False, True, 2, SaveDecision(True, "last", full_state=True)),
        ("last", 5, False, False, 2, SaveDecision(False, "")),
        ("none", 3, True, True, 3, SaveDecision(True, "resume", full_state=True)),
        ("none", 6, False, False, 3, SaveDecision(True, "resume", full_state=True)),
        ("none", 5, True, True, 3, SaveDecision(False, "")),
        ("none", 1, False, False, 1, SaveDecision(True, "resume", full_state=True)),
        ("every_n", 6, False, False, 4, SaveDecision(True, "every_n")),  # every_n_epochs=3 below
        ("every_n", 4, False, False, 4, SaveDecision(True, "resume", full_state=True)),
        ("every_n", 5, False, False, 4, SaveDecision(False, "")),
    ],
)
def test_decide_save_with_resume_checkpoints(
    policy: str, epoch: int, improved: bool, is_final: bool, resume_n: int, expected: SaveDecision
) -> None:
    decision = decide_save(
        policy, epoch, improved=improved, is_final=is_final, every_n_epochs=3,
        resume_every_n_epochs=resume_n,
    )
    assert decision == replace(expected, improved=improved)


@pytest.mark.parametrize(
    ("policy", "every_n", "resume_n", "improved_epochs", "saved"),
    [
        ("best", 1, 0, {1, 2, 5}, {1: "best", 2: "best", 5: "best"}),
        ("best", 1, 3, {1, 2, 5}, {1: "best", 2: "best", 3: "resume", 5: "best", 6: "resume"}),
        ("every_n", 2, 0, set(), {2: "every_n", 4: "every_n", 6: "every_n"}),
        ("all", 1, 0, set(), {e: "all" for e in range(1, 7)}),
        ("last", 1, 0, {1}, {6: "last"}),
        ("last", 1, 4, {1}, {4: "resume", 6: "last"}),
        ("none", 1, 0, {1}, {}),
        ("none", 1, 2, {1}, {2: "resume", 4: "resume", 6: "resume"}),
    ],
)
def test_six_epoch_runs(
    policy: str, every_n: int, resume_n: int, improved_epochs: set[int], saved: dict[int, str]
) -> None:
    got = {}
    for epoch in range(1, 7):
        d = decide_save(
            policy, epoch, improved=epoch in improved_epochs, is_final=epoch == 6,
            every_n_epochs=every_n, resume_every_n_epochs=resume_n,
        )
        assert d.save == bool(d.reason)
        # the optimizer state is saved on resume epochs, and only then
        assert d.full_state == (d.save and resume_n > 0 and epoch % resume_n == 0)
        if d.save:
            got[epoch] = d.reason
    assert got == saved


@pytest.mark.parametrize("policy", ["", "Best", "every", "always", "never"])
def test_unknown_policy(policy: str) -> None:
    with pytest.raises(ValueError, match="unknown checkpoint policy"):
        decide_save(policy, 1, improved=True, is_final=True)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            "best",
            {
                "num_to_keep": 1,
                "checkpoint_score_attribute": "checkpoint_rank",
                "checkpoint_score_order": "max",
            },
        ),
        ("last", {"num_to_keep": 1}),
        ("none", {"num_to_keep": 1}),
        ("every_n", {"num_to_keep": None}),
        ("all", {"num_to_keep": None}),
    ],
)
def test_ray_keep_settings(policy: str, expected: dict) -> None:
    assert ray_keep_settings(policy, "checkpoint_rank") == expected


def test_ray_keep_settings_cover_every_policy() -> None:
    for policy in POLICIES:
        settings = ray_keep_settings(policy, "rank")
        assert set(settings) <= {
            "num_to_keep", "checkpoint_score_attribute", "checkpoint_score_order",
        }
        # Only "best" ranks checkpoints by score; the others keep the newest.
        assert ("checkpoint_score_attribute" in settings) == (policy == "best")


def test_ray_keep_settings_are_valid_for_ray() -> None:
    # Constructing Ray's config object is pure Python (no cluster): it rejects bad arguments.
    from ray.train import CheckpointConfig

    for policy in POLICIES:
        CheckpointConfig(**ray_keep_settings(policy, "checkpoint_rank"))


def test_a_preemption_is_a_full_state_save_and_never_an_improvement() -> None:
    assert PREEMPTION == SaveDecision(True, "preempt", full_state=True, improved=False)


def test_rank_score_puts_every_improvement_above_everything_saved_before_it() -> None:
    # Ray keeps one checkpoint by this score under "best": a save that is not an improvement
    # (resume, preemption) ranks half a point below the best before it, never above it.
    assert rank_score(1, True) == 1 and rank_score(1, False) == 0.5
    assert rank_score(1, True) < rank_score(2, False) < rank_score(2, True)
