"""``orchestrator predict`` without Ray: the argument mistakes, the run, ``--data`` and
``--out`` refused in one line with exit 2 before Ray starts (through ``python -m
orchestrator``, as a user runs it), and the pieces a job is made of: the rows' positions
across files and row groups, rows into the model's input, the output table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.errors import UserError
from orchestrator.results.predict import check_out, parquet_input
from orchestrator.results.predictor import (
    Source,
    model_inputs,
    output_table,
    read_pieces,
)
from tests.unit.run_files import write_checkpoint_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A finished run's directory: a best checkpoint and the summary.json naming it."""
    run = tmp_path / "run"
    best = write_checkpoint_dir(run, 2, 0.5, is_best=True)
    (run / "summary.json").write_text(json.dumps({"monitor": "val_loss",
                                                  "best_checkpoint": str(best)}))
    return run


def write_parts(where: Path, sizes: list[int], row_group: int = 1000) -> None:
    """Files of ``sizes`` rows (``x``: 2 floats, ``label``), each in row groups."""
    where.mkdir(parents=True, exist_ok=True)
    start = 0
    for index, size in enumerate(sizes):
        values = np.arange(start, start + size, dtype=np.float32)
        x = pa.FixedSizeListArray.from_arrays(pa.array(np.repeat(values, 2)), 2)
        pq.write_table(pa.table({"x": x, "label": pa.array(values.astype(np.int64))}),
                       where / f"part-{index}.parquet", row_group_size=row_group)
        start += size


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "predict", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_bad_input_is_one_line_exit_2_before_ray_and_nothing_written(run_dir, tmp_path):
    """Each mistake a user makes, through the CLI: one line naming the field, exit 2, no Ray
    started (it would say so: these take a second), no output directory made."""
    data = tmp_path / "data"
    write_parts(data, [3])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not the project's")
    out = str(tmp_path / "out")
    cases = [
        ([str(run_dir), "--out", out], "one of the arguments --data --split is required"),
        ([str(run_dir), "--data", str(data), "--split", "val", "--out", out],
         "argument --split: not allowed with argument --data"),
        ([str(run_dir), "--split", "train", "--out", out], "argument --split: invalid choice"),
        ([str(run_dir), "--data", str(tmp_path / "nowhere"), "--out", out],
         f"--data: {tmp_path / 'nowhere'} does not exist"),
        ([str(run_dir), "--data", str(run_dir / "summary.json"), "--out", out],
         "--data: "),
        ([str(run_dir), "--data", str(data), "--out", str(foreign)],
         f"--out: {foreign} exists and was not written by orchestrator predict"),
        ([str(run_dir), "--data", str(data), "--out", str(data / "preds")],
         "--out: "),
        ([str(run_dir), "--data", str(data), "--out", out, "--batch-size", "0"],
         "--batch-size: 0; give 1 or more rows"),
        ([str(tmp_path / "no-run"), "--data", str(data), "--out", out],
         "no summary.json or leaderboard.json here"),
    ]
    for args, says in cases:
        done = cli(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (args, done.stderr)
        assert says in lines[0], (says, lines[0])
    assert not Path(out).exists() and not (data / "preds").exists()
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_out_may_be_new_empty_or_an_earlier_output(tmp_path):
    assert check_out(str(tmp_path / "new"), None) == str(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_out(str(tmp_path / "empty"), None)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "_predictions.json").write_text("{}")
    (earlier / "part.parquet").write_bytes(b"")
    check_out(str(earlier), None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_out(str(tmp_path / "file"), None)


def test_rows_are_numbered_by_position_across_files_and_row_groups(tmp_path):
    """Files in path order, rows in file order, whichever piece (row group) reads them."""
    write_parts(tmp_path / "data", [5, 7, 4], row_group=3)
    found = parquet_input(str(tmp_path / "data"))
    assert found.rows == 16 and found.columns == ["x", "label"]
    assert len(found.pieces) == 2 + 3 + 2  # row groups of 3 rows
    pieces = {key: np.array([p[key] for p in found.pieces]) for key in found.pieces[0]}
    tables = list(read_pieces(pieces, filesystem=found.filesystem, columns=["x"],
                              add_ids=True, rows=2))
    table = pa.concat_tables(tables)
    assert table.column_names == ["x", "row_id"]
    ids = table.column("row_id").to_numpy()
    assert np.array_equal(ids, np.arange(16))  # the i-th row of the input has id i
    first = table.column("x").combine_chunks().flatten().to_numpy()[::2]
    assert np.array_equal(first, ids.astype(np.float32))


def test_rows_become_the_models_input_as_in_training_and_the_output_has_one_row_each():
    """Named feature columns (the label not needed), the id column never an input."""
    from types import SimpleNamespace

    workload = SimpleNamespace(feature_columns=["a", "b"], label_column="y",
                               loss_fn=torch.nn.functional.cross_entropy)
    source = Source("rows", None, "row_id", "--data")
    batch = {"a": np.array([[1.0, 2.0], [3.0, 4.0]]), "b": np.array([5.0, 6.0]),
             "row_id": np.array([7, 9])}
    inputs = model_inputs(workload, source, batch)
    assert inputs.dtype == torch.float32
    assert inputs.tolist() == [[1.0, 2.0, 5.0], [3.0, 4.0, 6.0]]
    with pytest.raises(Exception, match=r"--data: no column 'b', which the model reads"):
        model_inputs(workload, source, {"a": batch["a"], "row_id": batch["row_id"]})

    table = output_table(batch["row_id"], torch.tensor([[0.1, 0.9], [2.0, -1.0]]), True,
                         "row_id")
    assert table.column("row_id").to_pylist() == [7, 9]
    assert table.column("predicted").to_pylist() == [1, 0]
    assert table.schema.field("logits").type == pa.list_(pa.float32(), 2)
    one_logit = output_table(np.array([0, 1]), torch.tensor([-0.5, 0.5]), True, "row_id")
    assert one_logit.column("predicted").to_pylist() == [0, 1]
    regression = output_table(np.array([0]), torch.tensor([[1.5]]), False, "row_id")
    assert regression.column_names == ["row_id", "logits"]
