"""``orchestrator predict`` on a real local Ray: the built-in Parquet digits' best model over
2 actors, checked against a one-process loop over the same rows (pyarrow in, the model in
torch): the same logits to 1e-6, every row exactly once, ``predicted`` the argmax; the
workload's own validation split (``--split val``); a column the model reads missing.

The run directory is written by hand, as the project writes one (a checkpoint through its own
snapshot and writer, ``summary.json`` naming it): no Ray Train run is needed to predict.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator import predict
from orchestrator.errors import UserError
from workers.contract.config import RunConfig

pytestmark = pytest.mark.integration
VAL_ROWS = 203  # an odd count: 2 actors in batches of 16 share it unevenly


def write_run(run_dir: Path, config: dict, model: torch.nn.Module) -> str:
    """A finished run's directory: its best checkpoint (``model``'s weights, the project's
    files and digests) and the ``summary.json`` that names it."""
    import pyarrow.fs as pafs

    from workers.checkpoint.snapshot import snapshot
    from workers.checkpoint.writer import write_checkpoint

    checkpoint = run_dir / "checkpoint_epoch0003_1"
    metadata = {"epoch": 3, "val_loss": 0.5, "monitor": "val_loss", "mode": "min",
                "is_best": True, "saved_because": "best", "config": config}
    write_checkpoint(snapshot(model.state_dict(), None, {"epoch": 3}, metadata),
                     pafs.LocalFileSystem(), str(checkpoint))
    (run_dir / "summary.json").write_text(json.dumps(
        {"monitor": "val_loss", "best_checkpoint": str(checkpoint)}))
    return str(checkpoint)


@pytest.fixture(scope="module")
def digits_run(ray_local, tmp_path_factory):
    """The built-in digits_parquet config's run, its weights seeded (no training needed to
    compare two ways of predicting), and its validation split's Parquet directory."""
    from workers.workloads.digits_parquet import build

    root = tmp_path_factory.mktemp("predict")
    params = {"data_dir": str(root / "data"), "hidden": 16, "val_rows": VAL_ROWS}
    cfg = RunConfig.model_validate({
        "name": "digits-parquet", "storage_path": str(root / "runs"), "seed": 0,
        "workload": {"entrypoint": "workers.workloads.digits_parquet:build", "params": params}})
    torch.manual_seed(1)
    model = build(**params).model
    run_dir = root / "runs" / "digits-parquet"
    write_run(run_dir, cfg.to_dict(), model)
    val_dir = next((root / "data").glob("v*/val"))
    return run_dir, val_dir, model.eval()


def one_process_logits(model: torch.nn.Module, data: Path, batch: int = 50) -> np.ndarray:
    """The same rows in one process: pyarrow reads them (files in path order), the model
    scores them in torch, batch by batch; (rows, classes)."""
    outputs = []
    for file in sorted(data.glob("*.parquet")):
        for record_batch in pq.ParquetFile(file).iter_batches(batch_size=batch):
            pixels = record_batch.column("pixels")
            x = torch.from_numpy(pixels.flatten().to_numpy().reshape(len(pixels), -1).copy())
            with torch.no_grad():
                outputs.append(model(x).numpy())
    return np.concatenate(outputs)


def read_output(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row ids, logits, predicted) of an output directory, as any Parquet reader sees it."""
    table = pq.read_table(out)  # pyarrow skips _predictions.json (a leading underscore)
    logits = table.column("logits").combine_chunks()
    assert pa.types.is_fixed_size_list(logits.type)
    values = logits.flatten().to_numpy().reshape(len(table), -1)
    return (table.column("row_id").to_numpy(), values, table.column("predicted").to_numpy())


def assert_same_predictions(out: Path, expected: np.ndarray) -> None:
    ids, logits, predicted = read_output(out)
    assert np.array_equal(np.sort(ids), np.arange(len(expected)))  # every row exactly once
    order = np.argsort(ids)
    np.testing.assert_allclose(logits[order], expected, rtol=1e-6, atol=1e-6)
    assert np.array_equal(predicted[order], expected.argmax(axis=1))


def test_two_actors_predict_what_one_process_computes(digits_run, tmp_path, capsys):
    run_dir, val_dir, model = digits_run
    out = tmp_path / "out"
    result = predict(run_dir, data=str(val_dir), out=str(out), num_actors=2, batch_size=16)

    assert result.rows == VAL_ROWS and result.out == str(out)
    assert_same_predictions(out, one_process_logits(model, val_dir))
    marker = json.loads((out / "_predictions.json").read_text())
    assert marker["status"] == "complete" and marker["rows"] == VAL_ROWS
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"Predicted {VAL_ROWS} rows in ") and last.endswith(f"-> {out}")
    assert "rows/s" in last


def test_split_val_is_the_workloads_own_rows_in_order(digits_run, tmp_path):
    """``--split val``: the workload's validation Ray Dataset, numbered in its own order,
    which is its files' order: the same ids and logits as --data over its directory. Written
    over an earlier output of predict, which it replaces."""
    run_dir, val_dir, model = digits_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "_predictions.json").write_text('{"status": "complete"}')
    (out / "stale.parquet").write_bytes(b"an earlier output's file")
    predict(run_dir, split="val", out=str(out), num_actors=2, batch_size=64)

    assert not (out / "stale.parquet").exists()
    assert_same_predictions(out, one_process_logits(model, val_dir))


def test_a_column_the_model_reads_missing_is_one_line_and_nothing_written(digits_run,
                                                                         tmp_path):
    run_dir, _, _ = digits_run
    data = tmp_path / "renamed"
    data.mkdir()
    pq.write_table(pa.table({"image": pa.array([[0.0] * 64] * 3, pa.list_(pa.float32(), 64)),
                             "label": [1, 2, 3]}), data / "part.parquet")
    out = tmp_path / "out"
    with pytest.raises(UserError) as refused:
        predict(run_dir, data=str(data), out=str(out))
    message = str(refused.value)
    assert message.startswith("--data: no column 'pixels', which the model reads "
                              "(workload.feature_columns; its columns: image, label)")
    assert "\n" not in message
    assert not out.exists()


def test_a_map_style_split_is_predicted_by_index(ray_local, tmp_path):
    """The built-in ``digits`` config's map-style validation split (``--split val`` in the
    README): row ``i`` is ``val_dataset[i]``, collated as its loaders collate it. In a
    terminal, with its progress bar (the actors count the rows done)."""
    import io

    from torch.utils.data import default_collate

    from orchestrator.start.console import Console
    from workers.workloads.digits import build

    params = {"hidden": 16}
    cfg = RunConfig.model_validate({
        "name": "digits-mlp", "storage_path": str(tmp_path / "runs"), "seed": 0,
        "workload": {"entrypoint": "workers.workloads.digits:build", "params": params}})
    torch.manual_seed(2)
    workload = build(**params)
    run_dir = tmp_path / "runs" / "digits-mlp"
    write_run(run_dir, cfg.to_dict(), workload.model)
    out = tmp_path / "preds"
    terminal = io.StringIO()
    console = Console(stream=terminal)
    console.interactive = True  # as in a terminal: rich's bar, fed by the progress actor
    result = predict(run_dir, split="val", out=str(out), num_actors=2, batch_size=64,
                     console=console)

    x, _ = default_collate([workload.val_dataset[i] for i in range(len(workload.val_dataset))])
    with torch.no_grad():
        expected = workload.model.eval()(x).numpy()
    assert result.rows == len(expected)
    assert_same_predictions(out, expected)
    assert terminal.getvalue().strip().splitlines()[-1] == result.line()
