"""``orchestrator export RUN``: the best model as a ``torch.export`` program (``export/model.pt2``)
or ONNX (``export/model.onnx``), checked against the saved weights before it is kept.

The model is the one ``load_best`` gives (the workload's model, the checkpoint's safetensors
weights). The example inputs are the first batch of the workload's validation split, made by
its own loader (its ``collate_fn``, ``train.batch_size``); the batch dimension is dynamic. The
file is written to a temporary directory, loaded back as a user would load it, and run on
EVERY batch of the validation split beside the model: the largest absolute difference of
their outputs is printed and recorded, and past the tolerance (``export_trace.ATOL`` +
``RTOL``) the export is refused. Only then do the file and its record, ``export/<format>.json``
(written last), land in the run directory; a refused or failed export leaves it as it was.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import storage
from orchestrator.errors import UserError
from workers.contract.names import EXPORT_DIR
from workers.loop.provenance import sha256_file

FORMATS = {"export": "model.pt2", "onnx": "model.onnx"}  # format -> the file it writes
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
DISTRIBUTION = "ray-best-model-orchestrator"  # pyproject's name: pip install '<it>[onnx]'


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote: the file (path or URI) and its record (``<format>.json``)."""

    file: str
    max_abs_diff: float
    record: dict[str, Any] = field(repr=False)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"export: format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            raise UserError(f"export: --format onnx needs {', '.join(missing)}: "
                            f"pip install '{DISTRIBUTION}[onnx]'")


def check_ours(export_dir: str, fmt: str) -> None:
    """A file where the export goes is replaced only if this tool wrote it: its record names
    it with the same digest. Anything else there is the user's, left as it is."""
    target = storage.join(export_dir, FORMATS[fmt])
    if not storage.exists(target):
        return
    record_path = storage.join(export_dir, f"{fmt}.json")
    try:
        recorded = storage.read_json(record_path)["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded != hashlib.sha256(storage.read_bytes(target)).hexdigest():
        raise UserError(f"{target}: exists and is not the export this tool recorded in "
                        f"{record_path}; move it away to export again")


def validation_batches(workload: Any, batch_size: int) -> Iterable[Any]:
    """The validation split in order, batched by the workload's own loader (a fastai
    Learner's: its validation DataLoader)."""
    from torch.utils.data import DataLoader

    from workers.loop.loaders import split_collate
    from workers.loop.ray_data import StreamedEval, is_ray_dataset, only_named_columns

    learn = (getattr(workload, "extras", None) or {}).get("learner")
    if learn is not None:
        return learn.dls.valid
    dataset = getattr(workload, "val_dataset", None)
    if dataset is None:
        raise UserError("export: the workload has no val_dataset, which the export is "
                        "traced on and checked against")
    collate = split_collate(workload, "val")
    if is_ray_dataset(dataset):
        return StreamedEval(only_named_columns(workload, dataset), collate, batch_size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)


def export(path: str | Path, fmt: str = "export", *, monitor: str | None = None,
           rank: int | None = None) -> ExportResult:
    """Export the best model of a run or a search (``path``) to ``<path>/export/``."""
    check_format(fmt)
    from orchestrator.api import load_best
    from workers.contract.user_errors import UserInputError

    root = storage.resolve(str(path))
    try:
        best = load_best(path, rank=rank, monitor=monitor)
    except UserInputError as exc:  # the workload's build, which the checkpoint's config names
        raise UserError(str(exc)) from None
    export_dir = storage.join(root, EXPORT_DIR)
    check_ours(export_dir, fmt)
    from workers.contract.config import RunConfig

    cfg = RunConfig.model_validate(best.metadata["config"])
    with tempfile.TemporaryDirectory(prefix="orchestrator-export-") as scratch:
        local = Path(scratch) / FORMATS[fmt]
        record = export_checked(best.model, best.workload, cfg.train.batch_size, fmt, local)
        record.update(source_checkpoint=best.checkpoint, epoch=best.metadata.get("epoch"),
                      monitor=best.metadata.get("monitor"),
                      file=f"{EXPORT_DIR}/{FORMATS[fmt]}", sha256=sha256_file(str(local)),
                      size_bytes=local.stat().st_size)
        target = storage.join(export_dir, FORMATS[fmt])
        storage.write_bytes(target, local.read_bytes())
    storage.write_json(storage.join(export_dir, f"{fmt}.json"), record)  # last: it vouches
    return ExportResult(file=target, max_abs_diff=record["max_abs_diff"], record=record)


def export_checked(model: Any, workload: Any, batch_size: int, fmt: str,
                   out: Path) -> dict[str, Any]:
    """Trace ``model`` to ``out`` on the first validation batch, then run the file on every
    validation batch beside ``model``; the check's record, or one line refusing it."""
    import torch

    from orchestrator.results import export_trace as tr
    from workers.contract.user_errors import UserInputError

    model = model.cpu().eval()
    reader = tr.BatchReader.of(workload)
    started = time.monotonic()
    try:
        stream = iter(validation_batches(workload, batch_size))
        first = next(stream, None)
        if first is None:
            raise UserError("export: the validation split is empty; nothing to trace it on")
        example = reader.inputs(first)
        tr.trace(model, example, fmt, out)
        traced_s = time.monotonic() - started
        loaded = tr.load(fmt, out, example)
        check = tr.compare(model, loaded, reader, itertools.chain([first], stream))
    except UserInputError as exc:  # the workload's own data or loader, found by the loop
        raise UserError(str(exc)) from None
    if not check.within:
        raise UserError(
            f"export: refused: the exported model's outputs differ from the saved model's by "
            f"up to {check.max_abs_diff:.3g} (validation batch {check.worst_batch}), beyond "
            f"the tolerance (atol {tr.ATOL:g} + rtol {tr.RTOL:g}); nothing was written")
    return {
        "format": fmt, "max_abs_diff": check.max_abs_diff,
        "tolerance": {"atol": tr.ATOL, "rtol": tr.RTOL},
        "compared_on": "the whole validation split", "batches": check.batches,
        "rows": check.rows, "batch_size": batch_size,
        "input_shape": loaded.input_shapes, "example_shape": tr.example_shapes(example),
        "dynamic_batch": all(s[:1] == ["batch"] for s in loaded.input_shapes.values() if s),
        "torch": torch.__version__, **_onnx_versions(fmt),
        "trace_seconds": round(traced_s, 3),
        "check_seconds": round(time.monotonic() - started - traced_s, 3),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _onnx_versions(fmt: str) -> dict[str, str]:
    if fmt != "onnx":
        return {}
    from importlib.metadata import version

    return {name: version(name) for name in ONNX_PACKAGES}
