"""The benchmark's arithmetic: epoch times, blocked time per save, ratios, orders."""

from __future__ import annotations

import pytest

from bench import stats


def record(stamps, saved, rank0=None, report_s=None, **extra):
    n = len(stamps)
    return {
        "stamps": stamps, "saved": saved, "rank0": rank0 or [{} for _ in range(n)],
        "report_s": report_s if report_s is not None else [0.01] * n, "epochs": n,
        "written_bytes": 0, "written_weight_bytes": 0, "peak_files": 0, "peak_bytes": 0,
        "peak_rss_bytes": 0, "worker_cpu_s": 2.0 * n, "controller_cpu_s": [], **extra,
    }


def test_intervals_leave_out_the_first_epoch():
    assert stats.intervals([10.0, 11.0, 11.5, 13.0]) == [1.0, 0.5, 1.5]
    assert stats.intervals([10.0]) == []


def test_blocked_per_save_counts_only_the_reports_excess():
    r = record(
        [0.0, 1.0, 2.0, 3.0], [True, False, True, True],
        rank0=[{"save_blocked_seconds": 0.010}, {}, {"save_blocked_seconds": 0.020},
               {"bench_save_seconds": 0.5}],
        report_s=[0.004, 0.003, 0.009, 0.001],
    )
    # epoch 1: 10 ms + (4 - 3) ms; epoch 3: 20 ms + (9 - 3) ms; epoch 4: 500 ms + 0
    assert stats.blocked_per_save(r, plain_report_s=0.003) == pytest.approx([0.011, 0.026, 0.5])


def test_summarize_pools_rounds_and_compares_copy_time():
    a = record([0.0, 1.0, 2.0, 3.0], [True, False, True, False],
               rank0=[{"save_blocked_seconds": 0.02, "snapshot_seconds": 0.01}, {},
                      {"save_blocked_seconds": 0.03, "snapshot_seconds": 0.02}, {}])
    b = record([0.0, 2.0, 4.0, 6.0], [False] * 4, controller_cpu_s=[1.0, 1.3, 1.6, 1.9])
    row = stats.summarize([a, b], plain_report_s=0.01)
    assert row["epoch_s_median"] == 1.5  # of 1, 1, 1, 2, 2, 2
    assert row["epoch_s_mean"] == 1.5  # median of the runs' means 1 and 2
    assert row["blocked_s_median"] == pytest.approx(0.025)
    assert row["blocked_s_max"] == pytest.approx(0.03)
    assert row["copy_s_median"] == pytest.approx(0.015)
    assert row["blocked_over_copy"] == pytest.approx(0.025 / 0.015)
    assert row["saves_per_run"] == 1
    assert row["controller_cpu_share"] == pytest.approx(0.15)  # 0.9 s over 6 s
    assert row["worker_cpu_s_per_epoch"] == 2.0


def test_summarize_without_saves():
    row = stats.summarize([record([0.0, 1.0], [False, False])], plain_report_s=0.0)
    assert row["blocked_s_median"] is None and row["blocked_over_copy"] is None


def test_ratios_to_bare_and_native():
    rows = {"native": {"epoch_s_median": 1.0, "epoch_s_mean": 1.0},
            "bare": {"epoch_s_median": 1.2, "epoch_s_mean": 1.5},
            "best": {"epoch_s_median": 1.26, "epoch_s_mean": 1.5}}
    stats.add_ratios(rows)
    assert rows["bare"]["x_native"] == pytest.approx(1.2)
    assert rows["best"]["x_bare"] == pytest.approx(1.05)
    assert rows["best"]["x_bare_mean"] == pytest.approx(1.0)
    assert rows["native"]["x_native"] == 1.0


def test_rounds_alternate_direction():
    assert stats.round_orders(["a", "b", "c"], 3) == [
        ["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
