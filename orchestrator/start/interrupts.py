"""SIGINT (Ctrl-C) and SIGTERM (``ray job stop``, a scheduler): stop a run cleanly, once.

``SignalGuard.run`` runs the blocking fit in a thread, so that Ray Train installs no SIGINT
handler of its own (it does so only in the main thread) and the main thread stays free to
receive signals: the first one raises ``Interrupted`` there; the caller then stops Ray and
writes the run's record. A second signal while that happens exits at once, which damages
nothing already saved: every file is written atomically, metadata.json last.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them


class SignalGuard:
    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}
        self._active = threading.current_thread() is threading.main_thread()
        self._thread: threading.Thread | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:
            os.write(2, f"{signal.Signals(signum).name} again: stopping now\n".encode())
            os._exit(128 + signum)
        self.received.append(signum)

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
        """After ``run`` was interrupted: whether the fit thread ended within ``timeout``."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()
