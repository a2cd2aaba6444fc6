"""Errors that mean the user's input is wrong, found inside a worker.

The driver recognises them among a failed worker group's exceptions (by type, through Ray's
``WorkerGroupError.worker_failures``) and reports them as one line, exit 2, never retried.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """A user's mistake (config, workload), with a one-line message naming the field."""


class WorkloadError(UserInputError):
    """The workload cannot be imported or does not follow the protocol."""
