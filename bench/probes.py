"""Measurement probes: what the benchmark records, and where.

- ``ControllerClock`` (a ``ray.train.UserCallback``, in the Ray Train controller process):
  a wall-clock stamp per report, the bytes each save wrote to storage, rank 0's save timings,
  and the controller's own CPU time.
- ``WorkerProbe`` (a Ray Train worker and train-context callback, in each worker): its pid
  (for the memory sampler) and, on rank 0, how long each ``ray.train.report`` call blocked.
- ``Sampler`` (a thread in the benchmark's process): every few milliseconds, the files and
  bytes held in the run directory, and each training process's peak RSS and CPU time.

Everything is appended to JSON-lines files in a log directory on this machine (the
benchmark runs on one node), read back by ``read_jsonl`` after the run.
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from workers.compat import (
    TRAIN_HEALTH_CHECK_INTERVAL_ENV,
    TRAIN_SNAPSHOT_FILE,
    TRAIN_STORAGE_MARKER_FILE,
    internal_train_context,
    train_worker_callback_bases,
)

# Files a run keeps for its own bookkeeping: not counted as checkpoint storage.
BOOKKEEPING = frozenset({
    "history.json", "summary.json", TRAIN_SNAPSHOT_FILE, TRAIN_STORAGE_MARKER_FILE,
})
WEIGHT_FILES = frozenset({"model.safetensors", "model.pt"})
# Metrics the benchmark's own loops report (the baselines), and the project loop's.
WRITTEN_KEY = "bench_written_bytes"
SAVE_KEY = "bench_save_seconds"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_sizes(checkpoint: Any) -> tuple[int, int]:
    """(all bytes, weight-file bytes) of a persisted ``ray.train.Checkpoint``."""
    import pyarrow.fs as pafs

    fs = checkpoint.filesystem
    infos = fs.get_file_info(pafs.FileSelector(checkpoint.path, recursive=True))
    files = [i for i in infos if i.type == pafs.FileType.File]
    return (sum(i.size for i in files),
            sum(i.size for i in files if i.base_name in WEIGHT_FILES))


class ControllerClock(UserCallback):
    def __init__(self, log_dir: str) -> None:
        self.path = Path(log_dir) / "controller.jsonl"

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        stamp = time.time()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        record: dict[str, Any] = {
            "t": stamp, "epoch": metrics[0].get("epoch"), "pid": os.getpid(),
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "interval_env": os.environ.get(TRAIN_HEALTH_CHECK_INTERVAL_ENV),
            "rank0": {k: v for k, v in metrics[0].items() if k.endswith("_seconds")},
            "checkpoint": checkpoint.path if checkpoint else None,
        }
        if any(WRITTEN_KEY in m for m in metrics):
            # The benchmark's own loops count what each rank wrote (all ranks may write).
            record["written_bytes"] = sum(m.get(WRITTEN_KEY, 0) for m in metrics)
            record["written_weight_bytes"] = record["written_bytes"]
        elif checkpoint is not None:
            record["written_bytes"], record["written_weight_bytes"] = checkpoint_sizes(checkpoint)
        append_jsonl(self.path, record)


class WorkerProbe(*train_worker_callback_bases()):
    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self._rank: int | None = None

    def after_init_train_context(self):
        self._rank = internal_train_context().get_world_rank()
        append_jsonl(Path(self.log_dir) / "workers.jsonl",
                     {"rank": self._rank, "pid": os.getpid(), "niceness": os.nice(0)})

    @contextmanager
    def on_report(self):
        started = time.perf_counter()
        yield
        if self._rank == 0:
            append_jsonl(Path(self.log_dir) / "reports.jsonl",
                         {"report_s": time.perf_counter() - started})


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in bytes, from /proc."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def storage_held(run_dir: Path) -> tuple[int, int]:
    """(files, bytes) in ``run_dir``, bookkeeping files aside; temp files count."""
    files = size = 0
    for root, _, names in os.walk(run_dir):
        for name in names:
            if name in BOOKKEEPING:
                continue
            try:
                size += os.stat(os.path.join(root, name)).st_size
                files += 1
            except FileNotFoundError:  # deleted between listing and stat
                pass
    return files, size


class Sampler:
    """Polls storage and the training processes until stopped.

    ``pids()`` returns the training processes' pids as they become known. A process's peak
    RSS is its VmHWM (the kernel's high-water mark, the same as its ru_maxrss); the peak host
    memory of a run is the sum of those over its training processes.
    """

    def __init__(self, run_dir: Path, pids: Any, period_s: float = 0.02) -> None:
        self.run_dir, self.pids, self.period_s = run_dir, pids, period_s
        self.peak_files = self.peak_bytes = 0
        self.hwm: dict[int, int] = {}
        self.cpu_s: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        files, size = storage_held(self.run_dir) if self.run_dir.exists() else (0, 0)
        self.peak_files, self.peak_bytes = max(self.peak_files, files), max(self.peak_bytes, size)
        for pid in self.pids():
            try:
                self.hwm[pid] = _proc_status(pid)["VmHWM"]
                self.cpu_s[pid] = _proc_cpu_s(pid)
            except (FileNotFoundError, ProcessLookupError, KeyError):
                pass  # exited: its last sample stands

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period_s)
        self.sample()

    @property
    def peak_rss_bytes(self) -> int:
        return sum(self.hwm.values())
