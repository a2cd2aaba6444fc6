"""Every test's Ray uses a token from the environment: Ray 2.60 would otherwise generate one
into ~/.ray/auth_token, and tests never write to the home directory."""

from __future__ import annotations

import os
import secrets

import pytest

os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


@pytest.fixture(autouse=True)
def _no_inherited_wandb_service():
    """W&B puts its service's address in this process's environment (``WANDB_SERVICE``) the
    first time a test runs W&B in process; every later test's subprocess (an ``orchestrator``
    command, given ``os.environ``) would then connect to that service, which may be gone or
    busy with another run: a search's trial once hung there for 400 s. Each test starts
    without it, as a user's shell does."""
    os.environ.pop("WANDB_SERVICE", None)
    yield
