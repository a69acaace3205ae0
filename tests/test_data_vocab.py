"""Vocabulary: train-only counts equal a brute-force count; ids by count; OOV handling."""

from __future__ import annotations

import csv
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CRITEO_SAMPLE

from mec_torchrec.data import prepare_dataset, readers
from mec_torchrec.data import vocab as vocab_module
from mec_torchrec.data.spec import CRITEO_CATEGORICAL, CRITEO_DENSE, load_dataset_spec


@pytest.mark.parametrize("hash_lookup_max", [1 << 16, 0], ids=["hash-lookup", "sorted-lookup"])
def test_counts_match_a_brute_force_count_of_train_only(write_spec, tmp_path, monkeypatch,
                                                       hash_lookup_max):
    if not CRITEO_SAMPLE.is_file():
        pytest.skip(f"{CRITEO_SAMPLE} (the shared Criteo sample) is not on this machine")
    with open(CRITEO_SAMPLE) as f:
        rows = list(csv.DictReader(f))
    header = ",".join(rows[0])
    (tmp_path / "train.csv").write_text(
        "\n".join([header] + [",".join(r.values()) for r in rows[:150]]) + "\n")
    (tmp_path / "valid.csv").write_text(
        "\n".join([header] + [",".join(r.values()) for r in rows[150:]]) + "\n")
    monkeypatch.setattr(readers, "TEXT_BLOCK_BYTES", 2048)  # many partial counts to merge
    monkeypatch.setattr(vocab_module, "_COMPACT_EVERY", 3)
    monkeypatch.setattr(vocab_module, "HASH_LOOKUP_MAX", hash_lookup_max)
    spec = write_spec(format="csv", train="train.csv", valid="valid.csv", label="label",
                      dense=list(CRITEO_DENSE), categorical=list(CRITEO_CATEGORICAL), min_count=2)
    ds = prepare_dataset(load_dataset_spec(spec), tmp_path / "work")
    for name in CRITEO_CATEGORICAL:
        brute = Counter(r[name] for r in rows[:150])
        kept = sorted(((c, v) for v, c in brute.items() if c >= 2), key=lambda t: (-t[0], t[1]))
        vocab = ds.vocabulary(name)
        assert vocab.column("value").to_pylist()[:-1] == [v for _, v in kept]
        expected = [c for c, _ in kept] + [sum(c for c in brute.values() if c < 2)]
        assert ds.counts(name).tolist() == expected
        assert ds.num_embeddings[name] == len(kept) + 1
        # valid: seen-in-train values keep their id, everything else is the OOV (last) id
        ids = next(ds.batches("valid", 1000)).sparse_features[name].values().tolist()
        index = {v: i for i, (_, v) in enumerate(kept)}
        assert ids == [index.get(r[name], len(kept)) for r in rows[150:]]


def test_ids_are_ordered_by_count_with_ties_broken_by_value(write_spec, tmp_path):
    values = ["z"] * 3 + ["b"] * 2 + ["a"] * 2 + ["q"]
    pq.write_table(pa.table({"y": [0] * len(values), "f": values}), tmp_path / "t.parquet")
    spec = write_spec(format="parquet", train="t.parquet", label="y", categorical=["f"])
    ds = prepare_dataset(load_dataset_spec(spec), tmp_path / "work")
    assert ds.vocabulary("f").column("value").to_pylist() == ["z", "a", "b", "q", None]
    assert ds.counts("f").tolist() == [3, 2, 2, 1, 0]
    assert next(ds.batches("train", 8)).sparse_features["f"].values().tolist() == \
        [0, 0, 0, 2, 2, 1, 1, 3]


@pytest.mark.parametrize("hash_lookup_max", [1 << 16, 0], ids=["hash-lookup", "sorted-lookup"])
def test_missing_values_get_their_own_id_distinct_from_oov(write_spec, tmp_path, monkeypatch,
                                                           hash_lookup_max):
    monkeypatch.setattr(vocab_module, "HASH_LOOKUP_MAX", hash_lookup_max)
    pq.write_table(pa.table({"y": [0, 1, 0], "f": [None, None, 5]}), tmp_path / "t.parquet")
    spec = write_spec(format="parquet", train="t.parquet", label="y", categorical=["f"])
    ds = prepare_dataset(load_dataset_spec(spec), tmp_path / "work")
    assert next(ds.batches("train", 3)).sparse_features["f"].values().tolist() == [0, 0, 1]
    assert ds.num_embeddings["f"] == 3  # null, 5, OOV
