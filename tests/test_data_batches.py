"""Batches: rank sharding, even batch counts, seeded shuffling, multi-valued rows, idempotent prepare."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mec_torchrec.data import DataError, dataset, prepare, prepare_dataset
from mec_torchrec.data.spec import load_dataset_spec

ROWS = 103


@pytest.fixture
def ds(write_spec, tmp_path, monkeypatch):
    """103 rows in 2 source files, processed into many small row groups and shards; dense column
    ``rid`` is the row's index, ``f`` = rid % 7, multi-valued ``m`` has rid % 3 values."""
    monkeypatch.setattr(prepare, "ROW_GROUP_ROWS", 10)
    monkeypatch.setattr(prepare, "SHARD_ROWS", 40)
    monkeypatch.setattr(dataset, "SHUFFLE_BUFFER_ROWS", 25)
    rid = np.arange(ROWS)
    table = pa.table({"y": rid % 2, "rid": rid.astype(np.float64), "f": rid % 7,
                      "m": pa.array([[int(r)] * (r % 3) for r in rid], pa.list_(pa.int64()))})
    pq.write_table(table.slice(0, 60), tmp_path / "a.parquet")
    pq.write_table(table.slice(60), tmp_path / "b.parquet")
    spec = write_spec(format="parquet", train="*.parquet", label="y", dense=["rid"],
                      categorical=["f"], multi_valued=["m"], dense_transform="none")
    return prepare_dataset(load_dataset_spec(spec), tmp_path / "work")


def _row_ids(batches) -> list[int]:
    return [int(r) for b in batches for r in b.dense_features[:, 0].tolist()]


def test_batches_carry_the_rows_in_order_with_real_multi_valued_lengths(ds):
    batches = list(ds.batches("train", 16))
    assert [len(b.labels) for b in batches] == [16] * 6 + [7]
    assert _row_ids(batches) == list(range(ROWS))
    f_values = ds.vocabulary("f").column("value").to_pylist()
    m_values = ds.vocabulary("m").column("value").to_pylist()
    for b in batches:
        rid = b.dense_features[:, 0].long().tolist()
        assert b.labels.tolist() == [r % 2 for r in rid]
        assert [f_values[i] for i in b.sparse_features["f"].values().tolist()] == [r % 7 for r in rid]
        assert b.sparse_features["m"].lengths().tolist() == [r % 3 for r in rid]
        assert [m_values[i] for i in b.sparse_features["m"].values().tolist()] == \
            [r for r in rid for _ in range(r % 3)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_partition_the_rows_exactly_once(ds, shuffle):
    seen = []
    for rank in range(3):
        seen += _row_ids(ds.batches("train", 8, rank=rank, world_size=3, shuffle=shuffle,
                                    seed=5, even=False))
    assert sorted(seen) == list(range(ROWS))


def test_even_gives_every_rank_the_same_number_of_batches(ds):
    per_rank = [list(ds.batches("train", 8, rank=r, world_size=4, shuffle=True, even=True))
                for r in range(4)]
    assert len({len(b) for b in per_rank}) == 1
    ids = [i for batches in per_rank for i in _row_ids(batches)]
    assert len(ids) == len(set(ids)) == ROWS // 4 * 4  # at most world_size - 1 rows left out


def test_shuffle_is_a_seeded_permutation(ds):
    first = _row_ids(ds.batches("train", 8, shuffle=True, seed=1))
    assert first == _row_ids(ds.batches("train", 8, shuffle=True, seed=1))
    assert first != _row_ids(ds.batches("train", 8, shuffle=True, seed=2))
    assert first != list(range(ROWS)) and sorted(first) == list(range(ROWS))


def test_drop_last_drops_only_the_short_batch(ds):
    sizes = [len(b.labels) for b in ds.batches("train", 16, shuffle=True, drop_last=True)]
    assert sizes == [16] * (ROWS // 16)


def test_prepare_reuses_its_output_until_the_source_changes(ds, tmp_path):
    spec = load_dataset_spec(tmp_path / "spec.yaml")
    meta = ds.root / "dataset.json"
    before = meta.stat().st_mtime_ns
    assert prepare_dataset(spec, ds.root).num_rows("train") == ROWS
    assert meta.stat().st_mtime_ns == before
    pq.write_table(pq.read_table(tmp_path / "b.parquet").slice(0, 3), tmp_path / "b.parquet")
    assert prepare_dataset(spec, ds.root).num_rows("train") == 63


def test_bad_batch_arguments_are_errors(ds):
    with pytest.raises(DataError, match="rank 3"):
        next(ds.batches("train", 8, rank=3, world_size=3))
    with pytest.raises(DataError, match="no split 'valid'"):
        ds.num_rows("valid")
    with pytest.raises(DataError, match="fewer than world_size"):
        next(ds.batches("train", 8, world_size=200))
