"""The run's history: every evaluation's record, in order, at a cost that does not grow.

While a run goes, the recorder (in the Ray Train controller) appends each record to the
newest segment, ``history/NNNNNNNN.json``, which holds at most ``SEGMENT_RECORDS`` records
and is rewritten whole and atomically at each one (a local file renamed into place, or one
object on an object store, which has no append). So an evaluation writes the same few
kilobytes at the 10th and at the 10,000th, on a local disk or S3 alike, and a write cut
short leaves the segment as it was.

``history.json`` holds what the segments were compacted into, with the number of the last
segment it contains (``segments_through``). The summary compacts once when a run ends, and
so does a resume before its controller starts: it writes history.json whole, then deletes the
segments it holds (a stop between the two loses nothing: the reader skips them).

Reading replays history.json, then each newer segment in order, through ``merge_into``:
a restarted stretch's records replace the ones they re-trained, exactly as they did when
they were written.
"""

from __future__ import annotations

from orchestrator import storage
from orchestrator.results.epochs import merge_into
from workers.contract.names import HISTORY_FILE, HISTORY_SEGMENTS_DIR
from workers.contract.records import EpochRecord

SEGMENT_RECORDS = 64  # the most records one write carries
_SEGMENT_SUFFIX = ".json"


def segment_name(index: int) -> str:
    return f"{index:08d}{_SEGMENT_SUFFIX}"


def segment_numbers(run_dir: str) -> list[int]:
    """The numbers of the segments in the run directory, in order."""
    names = storage.list_files(storage.join(run_dir, HISTORY_SEGMENTS_DIR))
    return sorted(int(n.removesuffix(_SEGMENT_SUFFIX)) for n in names
                  if n.endswith(_SEGMENT_SUFFIX) and n.removesuffix(_SEGMENT_SUFFIX).isdigit())


def read_compacted(run_dir: str) -> tuple[list[EpochRecord], int]:
    """history.json's records and the last segment they hold; ([], 0) when it is missing or
    damaged from outside (every write is atomic): the summary then rebuilds the history
    from the checkpoints' own metadata."""
    path = storage.join(run_dir, HISTORY_FILE)
    if not storage.exists(path):
        return [], 0
    try:
        content = storage.read_json(path)
        history, through = content["history"], content.get("segments_through", 0)
    except (ValueError, KeyError, TypeError, AttributeError):
        return [], 0
    if not isinstance(history, list) or not isinstance(through, int):
        return [], 0
    return history, through


def _segment_records(run_dir: str, index: int) -> list[EpochRecord]:
    path = storage.join(run_dir, HISTORY_SEGMENTS_DIR, segment_name(index))
    try:
        records = storage.read_json(path)["records"]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # damaged from outside: the checkpoints' metadata repairs what it held
    return records if isinstance(records, list) else []


def read_history(run_dir: str) -> list[EpochRecord]:
    """Every record of the run, in order: history.json, then the newer segments replayed."""
    history, through = read_compacted(run_dir)
    history = list(history)
    for index in segment_numbers(run_dir):
        if index > through:
            for record in _segment_records(run_dir, index):
                merge_into(history, record)
    return history


def compact(run_dir: str, history: list[EpochRecord]) -> None:
    """history.json := ``history`` (read with ``read_history``, perhaps repaired), holding
    every segment there is now; then those segments are deleted."""
    numbers = segment_numbers(run_dir)
    _, through = read_compacted(run_dir)
    through = max([through, *numbers])
    storage.write_json(storage.join(run_dir, HISTORY_FILE),
                       {"history": history, "segments_through": through})
    folder = storage.join(run_dir, HISTORY_SEGMENTS_DIR)
    for index in numbers:
        storage.delete_file(storage.join(folder, segment_name(index)))
    if numbers and not storage.is_nonempty_dir(folder):
        storage.delete_dir(folder)


class HistoryLog:
    """The recorder's writer: each record goes into the newest segment, which it rewrites.

    A controller never writes into a segment an earlier one left: its first record starts a
    new segment after every one there is (and after those history.json holds), so it need
    not read the history at all."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self._index: int | None = None
        self._records: list[EpochRecord] = []

    def append(self, record: EpochRecord) -> None:
        if self._index is None:
            _, through = read_compacted(self.run_dir)
            self._index = max([through, *segment_numbers(self.run_dir)]) + 1
        elif len(self._records) >= SEGMENT_RECORDS:
            self._index, self._records = self._index + 1, []
        self._records.append(record)
        storage.write_json(
            storage.join(self.run_dir, HISTORY_SEGMENTS_DIR, segment_name(self._index)),
            {"records": self._records})
