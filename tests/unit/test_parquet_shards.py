"""A plain Parquet split read by each rank itself (``workers/loop/parquet_shards.py``): the
rows each rank trains and scores, the shuffle, the resume, the batches' shape. Parquet files
written and read with pyarrow; no Ray."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from workers.loop.parquet_shards import (
    ParquetEval,
    ParquetSplit,
    ParquetTrain,
    no_nulls,
    numeric_type,
    prefetched,
    shuffled,
)
from workers.loop.ray_data import columns_collate, rows_collate

# Three files of 20, 17 and 13 rows, in row groups of 6, 5 and 4 (the last of each shorter).
SIZES = ((20, 6), (17, 5), (13, 4))
ROWS = sum(rows for rows, _ in SIZES)


def write(path: Path) -> ParquetSplit:
    """Row ``i`` (counted over the files in order): ``id`` i, ``x`` [i, i + 0.5], ``y`` i % 3."""
    start, files = 0, []
    for index, (rows, group) in enumerate(SIZES):
        ids = np.arange(start, start + rows)
        x = np.stack([ids, ids + 0.5], axis=1).astype(np.float32)
        table = pa.table({"id": ids, "x": pa.FixedSizeListArray.from_arrays(
            pa.array(x.reshape(-1)), 2), "y": ids % 3})
        files.append(str(path / f"part-{index}.parquet"))
        pq.write_table(table, files[-1], row_group_size=group)
        start += rows
    footers = [pq.read_metadata(f) for f in files]
    schema = footers[0].schema.to_arrow_schema()
    return ParquetSplit(tuple(files), pafs.LocalFileSystem(), ("id", "x", "y"),
                        tuple(schema.field(c).type for c in ("id", "x", "y")),
                        tuple(tuple(f.row_group(g).num_rows for g in range(f.num_row_groups))
                              for f in footers))


@pytest.fixture
def split(tmp_path: Path) -> ParquetSplit:
    return write(tmp_path)


def ids_collate(batch: dict[str, torch.Tensor]) -> list[int]:
    assert batch["x"].shape == (len(batch["id"]), 2)  # one (B, 2) tensor
    assert torch.equal(batch["x"][:, 0].long(), batch["id"])  # the row's own values
    return batch["id"].tolist()


ids_collate.tensors_in = True  # type: ignore[attr-defined]


def train(split: ParquetSplit, rank: int, world: int = 3, epoch: int = 1, consumed: int = 0,
          batch: int = 4) -> list[list[int]]:
    stream = ParquetTrain(split, ids_collate, batch_size=batch, rank=rank, world_size=world,
                          seed=5)
    stream.set_epoch(epoch, consumed)
    return list(stream)


def test_every_rank_trains_as_many_rows_and_steps_each_row_once(split):
    epoch = [train(split, rank) for rank in range(3)]
    per_rank = ROWS // 3  # 16
    assert [sum(len(b) for b in batches) for batches in epoch] == [per_rank] * 3
    assert {len(batches) for batches in epoch} == {4}  # as many optimizer steps
    assert len(ParquetTrain(split, ids_collate, batch_size=4, rank=0, world_size=3,
                            seed=5)) == 4
    rows = [i for batches in epoch for b in batches for i in b]
    assert len(rows) == len(set(rows)) == 3 * per_rank  # each once; W - 1 = 2 left out


def test_the_epoch_order_is_the_same_on_a_restart_and_new_each_epoch(split):
    assert train(split, 1) == train(split, 1)
    assert train(split, 1, epoch=2) != train(split, 1)
    # A rank's rows change with the epoch (its row groups do), beyond its buffer's order.
    assert {i for b in train(split, 0) for i in b} != {i for b in train(split, 0, epoch=2)
                                                       for i in b}


def test_a_resume_mid_epoch_trains_the_batches_left_as_the_first_run_would(split):
    whole = [train(split, rank) for rank in range(3)]
    # Two batches of 4 trained on each of 3 ranks before the stop: 24 positions.
    for rank in range(3):
        assert train(split, rank, consumed=24) == whole[rank][2:]
    stream = ParquetTrain(split, ids_collate, batch_size=4, rank=0, world_size=3, seed=5)
    stream.set_epoch(1, 24)
    assert len(stream) == 2 and stream.position_after(2, 4) == 48


def test_validation_reads_each_row_once_in_order_none_padded(split):
    for world in (1, 2, 3, 4):
        shares = []
        for rank in range(world):
            scored = ParquetEval(split, ids_collate, 4, rank=rank, world_size=world)
            batches = list(scored)
            assert all(len(b) == 4 for b in batches[:-1])
            shares.append([i for b in batches for i in b])
        assert [i for share in shares for i in share] == list(range(ROWS))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_named_columns_and_every_column_batches_are_the_ray_streams(split):
    features, target = next(iter(ParquetEval(split, columns_collate(["x"], "y", "val"), 5,
                                             rank=0, world_size=1)))
    assert features.dtype == torch.float32 and features.shape == (5, 2)
    assert target.dtype == torch.int64 and target.tolist() == [0, 1, 2, 0, 1]
    every = rows_collate(object(), "val")  # no named columns, no collate_fn
    batch = next(iter(ParquetEval(split, every, 3, rank=0, world_size=1)))
    assert list(batch) == ["id", "x", "y"] and batch["x"].shape == (3, 2)


def test_a_workload_collate_gets_ray_datas_numpy_columns(split):
    """As Ray Data's ``iter_torch_batches`` hands a ``collate_fn`` (a NumPy dict, a
    fixed-size list column an object array of row arrays)."""
    from ray.data.block import BlockAccessor

    seen = []
    workload = type("W", (), {"collate_fn": staticmethod(lambda b: seen.append(b) or b)})()
    list(ParquetEval(split, rows_collate(workload, "val"), 4, rank=0, world_size=1))
    expected = BlockAccessor.for_block(pq.read_table(split.files[0]).slice(0, 4)
                                       ).to_batch_format("numpy")
    first = seen[0]
    assert list(first) == list(expected)
    for column in expected:
        assert first[column].dtype == expected[column].dtype
        assert first[column].shape == expected[column].shape
        np.testing.assert_array_equal(np.stack(first[column]), np.stack(expected[column]))


def test_the_shuffle_pool_draws_from_far_apart_rows_and_gives_each_once():
    chunks = ({"i": np.arange(s, s + 10)} for s in range(0, 1000, 10))
    batches = list(shuffled(chunks, 100, 8, np.random.default_rng(0)))
    rows = np.concatenate([b["i"] for b in batches])
    assert sorted(rows.tolist()) == list(range(1000))
    assert [len(b["i"]) for b in batches[:-1]] == [8] * (len(batches) - 1)
    assert np.ptp(batches[0]["i"]) > 40  # drawn from the whole pool, not its first batch
    # Fewer rows than the pool: every one, shuffled.
    few = list(shuffled(iter([{"i": np.arange(5)}]), 100, 2, np.random.default_rng(0)))
    assert sorted(np.concatenate([b["i"] for b in few]).tolist()) == list(range(5))


def test_prefetching_raises_the_readers_error_and_stops_when_the_loop_does():
    def failing():
        yield 1
        raise ValueError("bad file")

    with pytest.raises(ValueError, match="bad file"):
        list(prefetched(failing, 2))
    made = []

    def endless():
        while True:
            made.append(1)
            yield len(made)

    before = threading.active_count()
    stream = prefetched(endless, 2)
    assert [next(stream) for _ in range(3)] == [1, 2, 3]
    stream.close()
    assert threading.active_count() == before and len(made) <= 6


def test_only_numbers_and_fixed_size_lists_without_nulls_are_read_by_the_ranks(tmp_path):
    assert numeric_type(pa.float32()) and numeric_type(pa.list_(pa.list_(pa.int8(), 2), 3))
    assert not numeric_type(pa.string()) and not numeric_type(pa.list_(pa.float32()))
    pq.write_table(pa.table({"a": [1.0, None], "b": [1, 2]}), tmp_path / "n.parquet")
    footer = pq.read_metadata(tmp_path / "n.parquet")
    assert not no_nulls(footer, {"a"}) and no_nulls(footer, {"b"})


def test_a_damaged_file_is_named_in_the_error(split):
    """Data pages scribbled over, the footer intact (the driver read it before): the rank's
    read fails naming the file, whichever stream reads it."""
    damaged = split.files[1]
    data = bytearray(Path(damaged).read_bytes())
    data[8:len(data) // 2] = b"\xab" * (len(data) // 2 - 8)
    Path(damaged).write_bytes(bytes(data))
    with pytest.raises(OSError, match=rf"workload.train_dataset: {damaged} \(row group \d\) "
                                      "cannot be read: "):
        for rank in range(3):
            train(split, rank)
    with pytest.raises(OSError, match=rf"workload.val_dataset: {damaged} "):
        for rank in range(2):
            list(ParquetEval(split, ids_collate, 4, rank=rank, world_size=2))
