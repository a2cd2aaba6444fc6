"""The driver's wait for room for lost workers: one line a minute, then it gives up."""

from __future__ import annotations

import pytest

from orchestrator.start import watchdog
from orchestrator.start.watchdog import Waiting, Watchdog, WorkersLost


def test_a_wait_says_so_once_a_minute_and_gives_up_at_its_limit():
    waiting = Waiting(limit_s=150)
    assert waiting.update(0.0, room=True) == "ok"
    assert waiting.update(10.0, room=False) == "say"  # the first moment without room
    assert waiting.update(40.0, room=False) == "wait"
    assert waiting.update(70.0, room=False) == "say"  # a minute after the last line
    assert waiting.update(100.0, room=False) == "wait"
    assert waiting.update(130.0, room=False) == "say"
    assert waiting.update(160.0, room=False) == "give_up"  # 150 s after the wait began


def test_room_again_ends_the_wait_and_a_new_one_starts_from_zero():
    waiting = Waiting(limit_s=100)
    assert waiting.update(0.0, room=False) == "say"
    assert waiting.update(90.0, room=True) == "ok"  # a node came back
    assert waiting.update(95.0, room=False) == "say"
    assert waiting.update(150.0, room=False) == "wait"  # 55 s into the new wait
    assert waiting.update(196.0, room=False) == "give_up"  # 101 s into it


def test_the_watchdog_names_what_is_needed_and_what_is_there(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(watchdog.time, "monotonic", lambda: clock[0])
    room = [{"CPU": 2.0, "GPU": 0.0}]
    said: list[str] = []
    dog = Watchdog({"CPU": 2.0, "GPU": 0.0}, limit_s=30, say=said.append,
                   room=lambda: room[0])
    dog.tick()
    room[0] = {"CPU": 1.0, "GPU": 0.0}  # a node with one CPU is gone
    for t in range(3, 30, 3):
        clock[0] = float(t)
        dog.tick()
    assert len(said) == 1
    assert "2 CPU" in said[0] and "has 1 CPU now" in said[0] and "worker_wait_s=30" in said[0]
    clock[0] = 40.0
    with pytest.raises(WorkersLost, match=r"2 CPU needed, 1 CPU there.*worker_wait_s=30 s"):
        dog.tick()
