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


# The order files are handed to pytest-xdist's processes (``make test``: two, a file each at a
# time, ``--no-loadscope-reorder`` keeping this order): the longest integration files first
# (measured in a full run: 20 to 4 minutes of one process each, longest first), the rest of the
# integration tier, then the short unit and distributed files, which fill whatever time one
# process still has when the other is busy with its last long file. Only the order changes:
# every test runs.
LONGEST_FIRST = ("test_training.py", "test_ray_data.py", "test_tune.py", "test_search_optuna.py",
                 "test_wandb.py", "test_keep_top_k.py", "test_fastai_ray.py", "test_workloads.py",
                 "test_interrupts.py",
                 "test_s3_storage.py", "test_node_lost.py", "test_long_runs.py", "test_fsdp.py")


def _order(item: pytest.Item) -> tuple[int, int]:
    path = item.path
    if "integration" in path.parts:
        return (0, LONGEST_FIRST.index(path.name)) if path.name in LONGEST_FIRST else (1, 0)
    return (2, 0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_order)  # stable: the order within each file stays as written
