"""Rows of a Ray Dataset split turned into batches, and a worker's training stream standing
where a run continues: pure logic, no Ray (``workers/loop/ray_data.py``)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from workers.contract.user_errors import UserInputError
from workers.loop.ray_data import (
    StreamedTrain,
    arrow_collate,
    arrow_tensor,
    for_streaming,
    rows_collate,
)


def rows(n: int = 3) -> dict[str, np.ndarray]:
    """What ``take_batch(batch_format="numpy")`` gives for a tensor column and scalars."""
    pixels = np.empty(n, dtype=object)
    for i in range(n):
        pixels[i] = np.full(4, i, dtype=np.float32)
    return {"pixels": pixels, "height": np.arange(n, dtype=np.float64),
            "width": np.arange(n, dtype=np.int32), "label": np.arange(n, dtype=np.int64)}


def test_named_columns_become_features_and_target():
    one = rows_collate(SimpleNamespace(feature_columns=["pixels"], label_column="label"), "val")
    x, y = one(rows())
    assert x.shape == (3, 4) and x.dtype == torch.float32 and x[2, 0] == 2
    assert y.tolist() == [0, 1, 2] and y.dtype == torch.int64
    # Several columns side by side, float32 (float64 columns are the models' float32).
    several = rows_collate(SimpleNamespace(feature_columns=["height", "width", "pixels"],
                                           label_column="label"), "train")
    x, _ = several(rows())
    assert x.shape == (3, 6) and x.dtype == torch.float32 and x[1].tolist() == [1, 1, 1, 1, 1, 1]


def test_without_columns_or_collate_every_column_is_a_tensor_of_a_mapping():
    batch = rows_collate(SimpleNamespace(), "train")(rows())
    assert set(batch) == {"pixels", "height", "width", "label"}
    assert batch["height"].dtype == torch.float32 and batch["pixels"].shape == (3, 4)


def test_a_workload_collate_gets_the_column_arrays_and_its_failure_names_it():
    seen = {}

    def collate(batch):
        seen.update(batch)
        return torch.as_tensor(batch["height"]), torch.as_tensor(batch["label"])

    x, y = rows_collate(SimpleNamespace(collate_fn=collate), "val")(rows())
    assert set(seen) == {"pixels", "height", "width", "label"} and y.tolist() == [0, 1, 2]
    broken = rows_collate(SimpleNamespace(collate_fn=lambda batch: batch["missing"]), "test")
    with pytest.raises(UserInputError, match=r"^workload.collate_fn: it fails on a batch of "
                       r"test_dataset's rows \(columns pixels, height, width, label\) "
                       r"\(KeyError: 'missing'\)"):
        broken(rows())


@pytest.mark.parametrize("workload, message", [
    (SimpleNamespace(feature_columns=["pixel"], label_column="label"),
     "workload.val_dataset: no column 'pixel' (its columns: pixels, height, width, label)"),
    (SimpleNamespace(feature_columns="pixels"),
     "workload.feature_columns and workload.label_column: give both"),
])
def test_column_mistakes_name_the_split_and_the_column(workload, message):
    with pytest.raises(UserInputError) as caught:
        rows_collate(workload, "val")(rows())
    assert str(caught.value).startswith(message)


def test_a_column_that_cannot_become_a_tensor_is_named():
    batch = {**rows(), "pixels": np.array(["dark", "light", "dark"], dtype=object)}
    collate = rows_collate(SimpleNamespace(feature_columns=["pixels"], label_column="label"),
                           "train")
    with pytest.raises(UserInputError, match=r"^workload.train_dataset: column 'pixels' cannot "
                       "become a tensor"):
        collate(batch)


def arrow_rows(n: int = 6):
    """An Arrow batch as Ray Data hands it over: a fixed-size list column (rows of 2 x 3
    numbers), scalars, and a column no fast path takes (booleans)."""
    import pyarrow as pa

    grid = np.arange(n * 6, dtype=np.float32)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(grid), 3)
    return pa.table({"grid": pa.FixedSizeListArray.from_arrays(inner, 2),
                     "label": pa.array(np.arange(n, dtype=np.int64)),
                     "flag": pa.array([i % 2 == 0 for i in range(n)])})


def test_fixed_size_columns_become_one_tensor_of_the_batch_rows_only():
    import pyarrow as pa

    table = arrow_rows()
    # A batch cut out of two blocks: two chunks, each a slice (an offset into its buffers).
    batch = pa.concat_tables([table.slice(1, 2), table.slice(4, 2)])
    grid = arrow_tensor(batch.column("grid"))
    assert grid is not None and grid.shape == (4, 2, 3) and grid.dtype == torch.float32
    every = np.arange(36, dtype=np.float32).reshape(6, 2, 3)
    assert np.array_equal(grid.numpy(), every[[1, 2, 4, 5]])
    assert arrow_tensor(batch.column("label")).tolist() == [1, 2, 4, 5]
    one = table.slice(3, 2).column("grid")  # one chunk, sliced
    assert np.array_equal(arrow_tensor(one).numpy(), every[3:5])
    # A copy, writable: Arrow's buffers are the object store's read-only pages.
    grid += 1
    assert np.array_equal(table.column("grid").chunk(0).flatten().flatten().to_numpy()[:6],
                          np.arange(6, dtype=np.float32))
    # Nulls, booleans and strings are not taken (Ray Data's own conversion takes them).
    assert arrow_tensor(table.column("flag")) is None
    assert arrow_tensor(pa.chunked_array([pa.array([1.0, None])])) is None
    assert arrow_tensor(pa.chunked_array([pa.array(["a", "b"])])) is None


def test_an_arrow_batch_reaches_the_collate_as_tensors_in_column_order():
    seen = {}

    def collate(columns):
        seen.update(columns)
        return columns["grid"], columns["label"]

    x, y = arrow_collate(collate)(arrow_rows())
    assert list(seen) == ["grid", "label", "flag"]
    assert x.shape == (6, 2, 3) and y.tolist() == list(range(6))
    assert seen["flag"].dtype == torch.bool and seen["flag"].tolist()[:2] == [True, False]
    named = rows_collate(SimpleNamespace(feature_columns=["grid"], label_column="label"), "val")
    x, y = arrow_collate(named)(arrow_rows(3))
    assert x.shape == (3, 2, 3) and y.tolist() == [0, 1, 2]


class FakeDataset:
    """What ``for_streaming`` uses of a Ray Dataset: its context, ``copy``, ``select_columns``.
    As Ray 2.60's ``Dataset.copy``: the copy shares the context object unless ``_deep_copy``
    (``test_a_plain_copy_of_a_ray_dataset_shares_its_context`` checks Ray's own)."""

    def __init__(self, block_bytes: int) -> None:
        self.context = SimpleNamespace(target_max_block_size=block_bytes)
        self.columns: list[str] | None = None

    def copy(self, dataset, _deep_copy=False):
        twin = FakeDataset(dataset.context.target_max_block_size)
        if not _deep_copy:
            twin.context = dataset.context
        twin.columns = dataset.columns
        return twin

    def select_columns(self, columns):
        twin = self.copy(self)
        twin.columns = columns
        return twin


def test_splits_are_streamed_in_smaller_blocks_unless_the_workload_chose_a_size():
    from ray.data.context import DEFAULT_TARGET_MAX_BLOCK_SIZE

    from workers.loop.ray_data import STREAM_BLOCK_BYTES

    mine = FakeDataset(DEFAULT_TARGET_MAX_BLOCK_SIZE)
    named = SimpleNamespace(feature_columns="x", label_column="y")
    streamed = for_streaming(named, mine)
    assert streamed.columns == ["x", "y"]
    assert streamed.context.target_max_block_size == STREAM_BLOCK_BYTES < 2**27
    assert mine.context.target_max_block_size == DEFAULT_TARGET_MAX_BLOCK_SIZE  # untouched
    chosen = for_streaming(SimpleNamespace(), FakeDataset(2**20))
    assert chosen.columns is None and chosen.context.target_max_block_size == 2**20
    # No named columns (no select_columns in between): the workload's Dataset is untouched.
    every = FakeDataset(DEFAULT_TARGET_MAX_BLOCK_SIZE)
    assert for_streaming(SimpleNamespace(), every).context.target_max_block_size == (
        STREAM_BLOCK_BYTES)
    assert every.context.target_max_block_size == DEFAULT_TARGET_MAX_BLOCK_SIZE


def test_a_plain_copy_of_a_ray_dataset_shares_its_context():
    """The premise of ``for_streaming``'s deep copy, in Ray's own source (no Ray started)."""
    import inspect

    from ray.data import Dataset

    source = inspect.getsource(Dataset.copy)
    assert "_deep_copy" in inspect.signature(Dataset.copy).parameters
    assert "ds._context.copy()" in source  # the deep copy's
    assert re.search(r"ds\._context,\s*\n", source)  # the plain copy's: the same object


class FakeShard:
    """A worker's shard as ``StreamedTrain`` uses it: ``iter_torch_batches`` yields, in
    order, batches of row numbers (the collate is Ray's to apply: not called here)."""

    def __init__(self, rows: int) -> None:
        self.rows, self.calls = rows, []

    def iter_torch_batches(self, *, batch_size, **options):
        self.calls.append({"batch_size": batch_size, **options})
        return iter([list(range(start, min(start + batch_size, self.rows)))
                     for start in range(0, self.rows, batch_size)])


def stream(shard: FakeShard, rows: int, rank: int = 0) -> StreamedTrain:
    return StreamedTrain(shard, lambda b: b, rows=rows, batch_size=4, rank=rank, world_size=2,
                         seed=7)


def test_a_training_stream_counts_its_steps_and_resumes_mid_epoch():
    # 21 rows on 2 workers: 10 each (Ray's equal split), 3 batches of 4, 4, 2.
    shard = FakeShard(10)
    train = stream(shard, 21)
    assert len(train) == 3 and train.batches_per_epoch(4) == 3
    assert [len(b) for b in train] == [4, 4, 2]
    assert train.position_after(1, 4) == 8 and train.position_after(3, 4) == 20
    # A resume after 2 batches on both workers (16 positions): the epoch is read again and
    # its last batch trained.
    train.set_epoch(1, consumed=16)
    assert len(train) == 1 and list(train) == [[8, 9]]
    # The stream has more rows than this epoch trains: every worker stops at its last step.
    longer = stream(FakeShard(13), 21)
    assert sum(len(b) for b in longer) == 12


def test_each_epoch_and_rank_shuffles_with_its_own_seed():
    seeds = set()
    for rank in (0, 1):
        shard = FakeShard(8)
        train = stream(shard, 16, rank)
        for epoch in (1, 2):
            train.set_epoch(epoch)
            list(train)
        assert all(c["local_shuffle_buffer_size"] >= 8 for c in shard.calls)
        seeds |= {c["local_shuffle_seed"] for c in shard.calls}
    assert len(seeds) == 4
