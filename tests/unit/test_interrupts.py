"""The driver's signal handling (``start.interrupts.SignalGuard``): one stop delivered twice
(``timeout`` signals its command, then its process group) is one stop; a later signal stops
now; and what a stop leaves unshown is printed from the history, once across a resume."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest

from orchestrator.start.console import Console
from orchestrator.start.interrupts import SAME_STOP_S, Interrupted, SignalGuard
from orchestrator.training.driver import EpochHandler
from workers.contract.config import RunConfig


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Exited(Exception):
    pass


def guard_with(clock: Clock, keep_record: bool = True) -> tuple[SignalGuard, list[int]]:
    exits: list[int] = []

    def exit(code: int) -> None:
        exits.append(code)
        raise Exited(code)

    return SignalGuard(keep_record=keep_record, clock=clock, exit=exit), exits


def test_a_signal_delivered_twice_within_the_moment_is_one_stop() -> None:
    clock = Clock()
    guard, exits = guard_with(clock)
    guard._handle(signal.SIGTERM, None)
    clock.now += 0.001  # timeout(1): the command, then its process group
    guard._handle(signal.SIGTERM, None)
    clock.now += SAME_STOP_S - 0.01
    guard._handle(signal.SIGTERM, None)
    assert guard.received == [signal.SIGTERM] and not guard.now and exits == []


def test_a_later_signal_stops_now_and_the_caller_still_writes_the_record(capfd) -> None:
    clock = Clock()
    guard, exits = guard_with(clock)
    guard._handle(signal.SIGTERM, None)
    clock.now += SAME_STOP_S + 0.5
    guard._handle(signal.SIGTERM, None)
    assert guard.now and exits == [] and guard.received == [signal.SIGTERM] * 2
    clock.now += 0.001  # "now", delivered twice too: still that one
    guard._handle(signal.SIGTERM, None)
    assert exits == []
    clock.now += SAME_STOP_S + 0.5  # a third: the process goes at once
    with pytest.raises(Exited):
        guard._handle(signal.SIGINT, None)
    assert exits == [130]
    assert capfd.readouterr().err == "SIGINT again: stopping now\n"


def test_without_keep_record_a_later_second_signal_exits_at_once() -> None:
    clock = Clock()
    guard, exits = guard_with(clock, keep_record=False)  # a search
    guard._handle(signal.SIGINT, None)
    clock.now += 0.5
    guard._handle(signal.SIGINT, None)  # Ctrl-C to a process group: the same stop
    assert exits == []
    clock.now += SAME_STOP_S
    with pytest.raises(Exited):
        guard._handle(signal.SIGTERM, None)
    assert exits == [143]


def test_real_signals_twice_to_this_process_interrupt_the_fit_once() -> None:
    guard, exits = guard_with(Clock())
    release = threading.Event()

    def fit() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        release.wait(10)

    with guard, pytest.raises(Interrupted) as stopped:
        guard.run(fit)
    assert stopped.value.exit_code == 143 and guard.received == [signal.SIGTERM]
    assert exits == [] and not guard.now
    release.set()
    assert guard.wait_for_fit(timeout=10)


def test_stop_now_ends_the_wait_for_the_fit() -> None:
    clock = Clock()
    guard, _ = guard_with(clock)
    release = threading.Event()
    guard._thread = threading.Thread(target=lambda: release.wait(30), daemon=True)
    guard._thread.start()
    assert not guard.wait_for_fit(timeout=0.3)  # still running: the grace period goes on
    guard._handle(signal.SIGTERM, None)
    clock.now += SAME_STOP_S + 1
    guard._handle(signal.SIGTERM, None)
    started = time.monotonic()
    assert not guard.wait_for_fit(timeout=30)
    assert time.monotonic() - started < 1
    release.set()


def handler_printing_to(out: io.StringIO, recorded_before: tuple[int, int]) -> EpochHandler:
    cfg = RunConfig.model_validate({"workload": {"entrypoint": "m:f"},
                                    "train": {"epochs": 3, "eval_every_n_steps": 1}})
    tracking = SimpleNamespace(handle=lambda record, staged: None)
    return EpochHandler(SimpleNamespace(cfg=cfg, console=Console(out), tracking=tracking),
                        recorded_before)


def record(epoch: int, step: int, global_step: int) -> dict:
    return {"epoch": epoch, "step": step, "global_step": global_step, "train_loss": 0.5,
            "val_loss": 0.4, "is_best": False}


def test_what_a_stop_left_unshown_is_printed_from_the_history_once() -> None:
    history = [record(1, 1, 1), record(1, 2, 2), record(2, 1, 3), record(2, 2, 4),
               record(3, 1, 5)]
    out = io.StringIO()
    handle = handler_printing_to(out, recorded_before=(1, 2))  # a resume after global step 2
    handle(history[2], None)  # the events stream brought one before the stop
    handle.show_the_rest(history)
    handle.show_the_rest(history)  # nothing twice
    lines = out.getvalue().splitlines()
    assert [line.split("(global ")[1].split(")")[0] for line in lines] == ["3", "4", "5"]
