"""The run's history in segments (``results/history.py``): what the recorder writes at each
evaluation stays small however long the run, and reading it back gives the same history as
one list merged record by record (restarted stretches replaced), across controllers,
compactions and stops between them. No Ray: a local run directory."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from orchestrator.results import history as hist
from orchestrator.results.epochs import merge_history
from orchestrator.results.summary import repair_history_file
from tests.unit.run_files import write_checkpoint_dir
from workers.contract.names import HISTORY_FILE, HISTORY_SEGMENTS_DIR


def record(epoch: int, global_step: int, val_loss: float = 0.5) -> dict:
    return {"epoch": epoch, "step": global_step, "global_step": global_step,
            "val_loss": val_loss, "is_best": False, "checkpoint": None}


def segments(run_dir: Path) -> list[Path]:
    return sorted((run_dir / HISTORY_SEGMENTS_DIR).glob("*.json"))


def test_records_go_into_segments_of_bounded_size_and_read_back_in_order(tmp_path):
    log = hist.HistoryLog(str(tmp_path))
    written = [record(1 + i // 50, i + 1, 1.0 / (i + 1)) for i in range(150)]
    sizes = []
    for r in written:
        log.append(r)
        sizes.append(segments(tmp_path)[-1].stat().st_size)  # what this append wrote
    assert [len(json.loads(p.read_text())["records"]) for p in segments(tmp_path)] == [
        64, 64, 22]
    assert hist.read_history(str(tmp_path)) == written
    # What one evaluation writes is at most a full segment, at the 64th or the 150th.
    assert max(sizes) < 1.1 * sizes[63] and sizes[-1] < sizes[63]
    assert not (tmp_path / HISTORY_FILE).exists()  # written only when compacted


def test_a_new_controller_starts_its_own_segment_and_its_restart_replaces_records(tmp_path):
    first = hist.HistoryLog(str(tmp_path))
    for step in range(1, 6):
        first.append(record(1, step))
    second = hist.HistoryLog(str(tmp_path))  # restarted from step 3's checkpoint
    second.append(record(1, 4, val_loss=0.1))
    assert [p.name for p in segments(tmp_path)] == ["00000001.json", "00000002.json"]
    got = hist.read_history(str(tmp_path))
    assert [r["global_step"] for r in got] == [1, 2, 3, 4]
    assert got[-1]["val_loss"] == 0.1


def test_compaction_holds_every_segment_and_a_stop_before_their_deletion_loses_nothing(
        tmp_path):
    log = hist.HistoryLog(str(tmp_path))
    for step in range(1, 71):
        log.append(record(1, step))
    before = hist.read_history(str(tmp_path))
    kept = tmp_path / "kept"
    shutil.copytree(tmp_path / HISTORY_SEGMENTS_DIR, kept)
    hist.compact(str(tmp_path), before)
    assert not (tmp_path / HISTORY_SEGMENTS_DIR).exists()
    content = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert content == {"history": before, "segments_through": 2}
    # Stopped after writing history.json, before deleting: the segments are still there.
    shutil.copytree(kept, tmp_path / HISTORY_SEGMENTS_DIR)
    assert hist.read_history(str(tmp_path)) == before
    # The next controller writes after what history.json holds, never into segment 1 or 2.
    after = hist.HistoryLog(str(tmp_path))
    after.append(record(2, 71))
    assert segments(tmp_path)[-1].name == "00000003.json"
    assert hist.read_history(str(tmp_path)) == [*before, record(2, 71)]


@pytest.mark.parametrize("seed", range(5))
def test_any_sequence_of_controllers_restarts_and_compactions_reads_as_one_merged_list(
        tmp_path, seed):
    """The reference: every record ever written merged one by one into a single list, as the
    recorder used to keep it. Controllers start (each a new HistoryLog), restart from an
    earlier step, and the history is compacted at random moments in between."""
    rng = random.Random(seed)
    reference: list[dict] = []
    log = hist.HistoryLog(str(tmp_path))
    step = 0
    for _ in range(400):
        roll = rng.random()
        if roll < 0.03:
            log = hist.HistoryLog(str(tmp_path))  # a resumed or restored controller
        elif roll < 0.06:
            hist.compact(str(tmp_path), hist.read_history(str(tmp_path)))
            log = hist.HistoryLog(str(tmp_path))
        if rng.random() < 0.05:
            step = max(0, step - rng.randint(1, 80))  # restarted from an earlier checkpoint
        step += 1
        r = record(1 + step // 30, step, rng.random())
        log.append(r)
        reference = merge_history(reference, r)
    assert hist.read_history(str(tmp_path)) == reference


def test_a_damaged_segment_is_skipped_and_the_summary_repairs_from_checkpoints(tmp_path):
    log = hist.HistoryLog(str(tmp_path))
    for epoch, loss in ((1, 0.9), (2, 0.5)):
        log.append({**record(epoch, epoch, loss), "step": None})
    write_checkpoint_dir(tmp_path, 2, 0.5, is_best=True)
    segments(tmp_path)[0].write_bytes(b'{"records": [{"epo')  # damaged from outside
    assert hist.read_history(str(tmp_path)) == []
    history, kept = repair_history_file(str(tmp_path))
    assert [r["epoch"] for r in history] == [2] and len(kept) == 1
    # Compacted: history.json holds the repaired history and the damaged segment is gone.
    assert json.loads((tmp_path / HISTORY_FILE).read_text())["history"] == history
    assert segments(tmp_path) == []
