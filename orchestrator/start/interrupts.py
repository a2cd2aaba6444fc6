"""SIGINT (Ctrl-C) and SIGTERM (``ray job stop``, a scheduler): stop a run cleanly, once.

``SignalGuard.run`` runs the blocking fit in a thread, so that Ray Train installs no SIGINT
handler of its own (it does so only in the main thread) and the main thread stays free to
receive signals: the first one raises ``Interrupted`` there; the caller then stops Ray and
writes the run's record.

One stop often arrives twice: ``timeout 900 orchestrator train ...`` (how CI scripts and job
wrappers bound a run) forwards a SIGTERM to its command and then to its whole process group,
the command again among them, within a millisecond. A signal within ``SAME_STOP_S`` of the one
that counted is that same stop, and changes nothing. A later one means "stop now": with
``keep_record`` (``orchestrator train``) the waits for the workers end at once (``now``) and
the caller still stops Ray and writes the record from what storage holds; a signal after that,
or any later second one without ``keep_record`` (a search), exits at once, which damages
nothing already saved: every file is written atomically, metadata.json last.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Seconds after a signal that counts during which another is the same stop delivered again
# (``timeout`` signals its command, then its process group), not a user's "stop now": long
# enough for any forwarding, short enough that a person's second Ctrl-C is heard.
SAME_STOP_S = 2.0


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them


class SignalGuard:
    def __init__(self, *, keep_record: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 exit: Callable[[int], Any] = os._exit) -> None:
        """``keep_record``: a second stop ends the waits (``now``) instead of the process,
        whose caller still writes the record. ``clock`` and ``exit``: for tests."""
        self.received: list[int] = []  # the signals that counted: the stop, then "now"
        self.now = False  # a second stop: wait for nothing more
        self.keep_record = keep_record
        self._clock, self._exit = clock, exit
        self._last_at = 0.0  # when the latest signal that counted arrived
        self._previous: dict[int, Any] = {}
        self._active = threading.current_thread() is threading.main_thread()
        self._thread: threading.Thread | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        at = self._clock()
        if self.received and at - self._last_at <= SAME_STOP_S:
            return  # the same stop delivered again
        self._last_at = at
        if not self.received:
            self.received.append(signum)
        elif self.keep_record and not self.now:
            self.received.append(signum)
            self.now = True
        else:
            os.write(2, f"{signal.Signals(signum).name} again: stopping now\n".encode())
            self._exit(128 + signum)

    def __enter__(self) -> SignalGuard:
        if self._active:
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def run(self, fn: Callable[[], Any], tick: Callable[[], None] = lambda: None) -> Any:
        """``fn()``'s result or exception, or ``Interrupted`` as soon as a signal arrives.
        ``tick``: called about ten times a second while waiting; what it raises stops the
        wait (``fn`` is left running: the caller stops Ray)."""
        if not self._active:  # not the main thread (a Tune trial): no signals here
            return fn()
        for signum in SIGNALS:  # again: ray.init installs a SIGTERM handler of its own
            signal.signal(signum, self._handle)
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                outcome["error"] = exc

        thread = self._thread = threading.Thread(target=target, name="fit", daemon=True)
        thread.start()
        while thread.is_alive() and not self.received:
            thread.join(0.1)
            tick()
        if self.received:
            raise Interrupted(self.received[0])
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def fit_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_for_fit(self, timeout: float) -> bool:
        """After ``run`` was interrupted: whether the fit thread ended within ``timeout``; a
        second stop (``now``) ends the wait at once."""
        deadline = time.monotonic() + timeout
        thread = self._thread
        while thread is not None and thread.is_alive() and not self.now:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            thread.join(min(0.1, left))
        return not self.fit_running()
