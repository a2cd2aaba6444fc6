"""What went wrong, in the user's terms: the two kinds of failure and how each is recognised.

- ``UserError``: bad input (config, arguments, workload, resources); one line, exit code 2,
  nothing started or written. Errors of this kind raised inside Ray workers
  (``workers.contract.user_errors.UserInputError``) arrive inside Ray's ``WorkerGroupError``; they
  are found there by type, never by matching text.
- ``TrainingError``: training itself failed (exit code 1).
"""

from __future__ import annotations

from collections.abc import Iterable

from workers.contract.user_errors import UserInputError


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class TrainingError(Exception):
    """The run did not end by itself: it failed (exit code 1) or was interrupted (130 for
    SIGINT, 143 for SIGTERM). Its message says what happened, in one line; the CLI adds the
    command that continues the run."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _causes(exc: BaseException | None):
    """``exc`` and what it wraps: Ray's task errors (``cause``) and Python's chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__


def user_error_in(exc: BaseException) -> str | None:
    """The message of the user's mistake that made a Ray Train run fail, if that is what
    happened: a ``UserInputError`` raised in any worker (the same on every rank)."""
    failures = getattr(exc, "worker_failures", None) or {}
    return user_error_among([exc, *failures.values()])


def user_error_among(failures: Iterable[BaseException]) -> str | None:
    """The first ``UserInputError`` message among these failures (and what they wrap)."""
    for failure in failures:
        # The innermost match is the original exception (Ray's wrapper of the same type
        # carries a traceback as its message).
        found = [c for c in _causes(failure) if isinstance(c, UserInputError)]
        if found:
            return str(found[-1]).strip().splitlines()[0]
    return None


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def failure_summary(exc: BaseException) -> str:
    """One line for a failed run: the original exception of the first failed worker (or of
    the controller), as ``Type: message``, without Ray's wrapping and traceback."""
    failures = getattr(exc, "worker_failures", None) or {}
    origin = next(iter(failures.values()), None) or getattr(exc, "controller_failure", None) \
        or exc
    innermost = list(_causes(origin))[-1]
    return one_line(getattr(innermost, "cause", None) or innermost)
