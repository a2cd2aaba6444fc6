"""Fault injection picks its target among the test's own run's processes
(``tests.integration.conftest.RunProcesses``): a fake process table with two local Rays on one
machine, ours started first; then the real table, with a child of this process."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.integration.conftest import Proc, RunProcesses, own_processes, process_table

OURS, THEIRS = "/tmp/rt-ours", "/tmp/ray"  # the temp dirs in the daemons' command lines
CONTROLLER = r"^ray::TrainController"


def two_rays() -> dict[int, Proc]:
    """pid -> (parent, start time, command line): our CLI run, then another engineer's."""
    def daemons(driver: int, temp: str, start: int) -> dict[int, Proc]:
        session = f"{temp}/ray/session_2026_{driver}"
        raylet = driver + 11
        return {
            driver + 10: Proc(driver, start + 1, f"/venv/ray/core/src/ray/gcs/gcs_server "
                                                 f"--log_dir={session}/logs"),
            raylet: Proc(driver, start + 1, f"/venv/ray/core/src/ray/raylet/raylet "
                                            f"--raylet_socket_name={session}/sockets/raylet"),
            driver + 12: Proc(driver, start + 2, f"python dashboard.py --session-dir={session}"),
            driver + 20: Proc(raylet, start + 3, "ray::TrainController.run"),
            driver + 21: Proc(raylet, start + 4, "ray::RayTrainWorker.run_train_fn"),
            driver + 22: Proc(raylet, start + 4, "ray::RayTrainWorker.run_train_fn"),
            driver + 23: Proc(raylet, start + 2, "ray::DashboardAgent"),
        }

    return {1: Proc(0, 0, "/sbin/init"), 100: Proc(1, 10, "python -m pytest tests/integration"),
            200: Proc(100, 20, "python -m orchestrator train run.yaml"),
            **daemons(200, OURS, 20),
            300: Proc(1, 50, "python -m pytest tests/integration/test_tune.py"),
            **daemons(300, THEIRS, 50)}


def by_name_newest(table: dict[int, Proc], pattern: str) -> int:
    """What ``pgrep -n -f`` answers: the newest matching process on the machine."""
    return max((p for p, proc in table.items() if re.search(pattern, proc.cmdline)),
               key=lambda p: table[p].started)


def test_the_drivers_descendants_are_the_run_and_the_newest_by_name_is_not():
    table = two_rays()
    assert by_name_newest(table, CONTROLLER) == 320  # the other run's controller
    run = RunProcesses(roots=[200], read=lambda: table)
    assert run.one(CONTROLLER) == 220
    assert set(run.find(r"^ray::")) == {220, 221, 222, 223}
    assert set(run.find()) == {200, 210, 211, 212, 220, 221, 222, 223}


def test_after_the_driver_died_its_ray_is_found_by_the_temp_dir_its_daemons_name():
    table = two_rays()
    del table[200]
    table = {pid: p._replace(ppid=1) if p.ppid == 200 else p for pid, p in table.items()}
    assert own_processes(table, marker=OURS) == {210, 211, 212, 220, 221, 222, 223}
    assert own_processes(table, marker=OURS).isdisjoint(own_processes(table, roots=[300]))


def test_workers_seen_once_are_followed_after_their_raylet_died_and_a_reused_pid_is_not():
    table = two_rays()
    run = RunProcesses(roots=[200], read=lambda: table)
    run.find()
    # The driver and its raylet are gone; the workers now belong to init and name nothing.
    for pid in (200, 210, 211, 212):
        del table[pid]
    for pid in (220, 221, 222, 223):
        table[pid] = table[pid]._replace(ppid=1)
    assert set(run.find(r"^ray::")) == {220, 221, 222, 223}
    # One worker exits and its pid goes to a process of the other run; the driver's pid too.
    table[221] = Proc(311, 90, "ray::RayTrainWorker.run_train_fn")
    table[200] = Proc(1, 91, "python -m orchestrator train other.yaml")
    table[201] = Proc(200, 92, "ray::IDLE")
    assert set(run.find(r"^ray::")) == {220, 222, 223}
    assert 200 not in run.find() and 201 not in run.find()


def test_one_refuses_an_ambiguous_or_missing_target():
    table = two_rays()
    run = RunProcesses(roots=[200], read=lambda: table)
    for pattern in (r"RayTrainWorker", r"^ray::Nothing"):  # two of them; none
        with pytest.raises(AssertionError, match="of this run"):
            run.one(pattern)


def test_the_real_process_table_holds_this_process_and_follows_its_child():
    table = process_table()
    assert table[os.getpid()].ppid == os.getppid()
    assert sys.executable.split("/")[-1] in table[os.getpid()].cmdline
    child = subprocess.Popen(["sleep", "60"])
    try:
        run = RunProcesses(roots=[os.getpid()])
        assert run.one(r"^sleep 60$") == child.pid
    finally:
        child.kill()
        child.wait()
    assert run.find(r"^sleep 60$") == {}
