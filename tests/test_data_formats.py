"""Readers for every format: processed rows and KJT contents match the source rows."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import CRITEO_SAMPLE
from torchrec.datasets.criteo import BinaryCriteoUtils

from mec_torchrec.data import prepare_dataset
from mec_torchrec.data.spec import CRITEO_CATEGORICAL, CRITEO_DENSE, load_dataset_spec

CRITEO_COLUMNS = {"label": "label", "dense": list(CRITEO_DENSE),
                  "categorical": list(CRITEO_CATEGORICAL)}


@pytest.fixture(scope="module")
def sample_rows() -> list[dict[str, str]]:
    if not CRITEO_SAMPLE.is_file():
        pytest.skip(f"{CRITEO_SAMPLE} (the shared Criteo sample) is not on this machine")
    with open(CRITEO_SAMPLE) as f:
        return list(csv.DictReader(f))


def _all_rows(ds, split: str):
    """Every row of ``split`` in order, as (label, dense [n_dense], {feature: [ids]})."""
    rows = []
    for b in ds.batches(split, 64):
        per_key = {k: [t.tolist() for t in jt.to_dense()]
                   for k, jt in b.sparse_features.to_dict().items()}
        for i in range(len(b.labels)):
            ids = {k: per_key[k][i] for k in ds.feature_names}
            rows.append((b.labels[i].item(), b.dense_features[i].tolist(), ids))
    return rows


def _value_of(ds, feature: str, ids: list[int]) -> list:
    values = ds.vocabulary(feature).column("value").to_pylist()
    return [values[i] for i in ids]


def _check_against_sample(ds, sample_rows) -> None:
    rows = _all_rows(ds, "train")
    vocab = {n: ds.vocabulary(n).column("value").to_pylist() for n in CRITEO_CATEGORICAL}
    assert len(rows) == len(sample_rows) == ds.num_rows("train")
    for (label, dense, ids), src in zip(rows, sample_rows):
        assert label == float(src["label"])
        expected = [math.log1p(max(float(src[n] or 0), 0.0)) for n in CRITEO_DENSE]
        np.testing.assert_allclose(dense, expected, rtol=1e-6)
        for name in CRITEO_CATEGORICAL:
            assert [vocab[name][i] for i in ids[name]] == [src[name]], (name, src[name])


def test_csv_reads_the_real_criteo_rows(sample_rows, write_spec, tmp_path):
    spec = write_spec(format="csv", train=str(CRITEO_SAMPLE), **CRITEO_COLUMNS)
    ds = prepare_dataset(load_dataset_spec(spec), tmp_path / "work")
    _check_against_sample(ds, sample_rows)
    assert ds.dense_names == list(CRITEO_DENSE) and ds.feature_names == list(CRITEO_CATEGORICAL)


def _write_tsv(path: Path, rows: list[dict[str, str]]) -> None:
    names = ["label", *CRITEO_DENSE, *CRITEO_CATEGORICAL]
    # Criteo's TSV holds integers ("260", not "260.0" as in the CSV sample).
    path.write_text("".join("\t".join(
        str(int(float(r[n]))) if n in CRITEO_DENSE and r[n] else r[n] for n in names) + "\n"
        for r in rows))


def test_criteo_tsv_reads_the_same_rows(sample_rows, write_spec, tmp_path):
    _write_tsv(tmp_path / "day_0", sample_rows)
    spec = write_spec(format="criteo_tsv", train="day_0", **CRITEO_COLUMNS)
    ds = prepare_dataset(load_dataset_spec(spec), tmp_path / "work")
    _check_against_sample(ds, sample_rows)


def test_criteo_npy_reads_torchrec_preprocessed_files(sample_rows, write_spec, tmp_path):
    _write_tsv(tmp_path / "day_0", sample_rows)
    stem = str(tmp_path / "day_0")
    BinaryCriteoUtils.tsv_to_npys(stem, f"{stem}_dense.npy", f"{stem}_sparse.npy",
                                  f"{stem}_labels.npy")
    spec = write_spec(format="criteo_npy", train="day_0_dense.npy", dense_transform="none",
                      **CRITEO_COLUMNS)
    ds = prepare_dataset(load_dataset_spec(spec), tmp_path / "work")
    rows = _all_rows(ds, "train")
    dense = np.load(f"{stem}_dense.npy")
    sparse = np.load(f"{stem}_sparse.npy")
    labels = np.load(f"{stem}_labels.npy")
    assert len(rows) == len(sample_rows)
    vocab = {n: ds.vocabulary(n).column("value").to_pylist() for n in CRITEO_CATEGORICAL}
    for i, (label, dense_row, ids) in enumerate(rows):
        assert label == labels[i, 0]
        np.testing.assert_array_equal(np.float32(dense_row), dense[i])
        for j, name in enumerate(CRITEO_CATEGORICAL):
            assert [vocab[name][k] for k in ids[name]] == [sparse[i, j]]


def test_parquet_with_list_and_delimited_multi_valued_features(write_spec, tmp_path):
    table = pa.table({
        "click": [1, 0, 0, 1],
        "price": [3.0, None, -2.0, 10.0],
        "city": ["a", "b", None, "a"],
        "user": pa.array([7, 7, 8, 9], pa.int32()),
        "tags": pa.array([[5, 6], [], None, [6, 6, 7]], pa.list_(pa.int64())),
    })
    pq.write_table(table, tmp_path / "t.parquet")
    spec = write_spec(format="parquet", train="t.parquet", label="click", dense=["price"],
                      categorical=["city", "user"], multi_valued=["tags"])
    ds = prepare_dataset(load_dataset_spec(spec), tmp_path / "work")
    b = next(ds.batches("train", 10))
    assert b.labels.tolist() == [1.0, 0.0, 0.0, 1.0]
    np.testing.assert_allclose(b.dense_features[:, 0], np.log1p([3.0, 0.0, 0.0, 10.0]), rtol=1e-6)
    tags = b.sparse_features["tags"]
    assert tags.lengths().tolist() == [2, 0, 0, 3]
    assert _value_of(ds, "tags", tags.values().tolist()) == [5, 6, 6, 6, 7]
    assert _value_of(ds, "city", b.sparse_features["city"].values().tolist()) == ["a", "b", None, "a"]
    assert b.sparse_features.values().dtype == torch.int64
    assert b.dense_features.dtype == b.labels.dtype == torch.float32


def test_csv_multi_valued_strings_split_on_the_spec_delimiter(write_spec, tmp_path):
    (tmp_path / "t.csv").write_text("y,site,genres\n1,s1,rock^pop\n0,s2,pop\n1,s1,\n")
    spec = write_spec(format="csv", train="t.csv", label="y", categorical=["site"],
                      multi_valued=["genres"], multi_valued_delimiter="^")
    ds = prepare_dataset(load_dataset_spec(spec), tmp_path / "work")
    genres = next(ds.batches("train", 3)).sparse_features["genres"]
    assert genres.lengths().tolist() == [2, 1, 1]
    assert _value_of(ds, "genres", genres.values().tolist()) == ["rock", "pop", "pop", ""]
    assert ds.dense_names == [] and next(ds.batches("train", 3)).dense_features.shape == (3, 0)
