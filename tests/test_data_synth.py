"""The built-in data: reproducible, Criteo-shaped, and hard in the right way."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mec_torchrec.cli import main
from mec_torchrec.data import load_dataset_spec, prepare_dataset
from mec_torchrec.data.baselines import roc_auc
from mec_torchrec.data.synth import CRITEO_KAGGLE_CARDINALITIES, scaled_cardinalities, synthesize


def _tables(out: Path) -> dict[str, object]:
    return {str(p.relative_to(out)): pq.read_table(p) for p in sorted(out.glob("*/*.parquet"))}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, synthesize(out, rows=20_000, scale=0.002, seed=3, multi_valued=1, progress=False)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    def run(name: str, seed: int) -> dict[str, object]:
        synthesize(tmp_path / name, rows=3000, scale=0.001, seed=seed, progress=False)
        return _tables(tmp_path / name)

    a, b, c = run("a", seed=7), run("b", seed=7), run("c", seed=8)
    assert list(a) == list(b) and all(a[k].equals(b[k]) for k in a)
    assert not all(a[k].equals(c[k]) for k in a)


def test_cardinalities_are_criteo_kaggle_scaled_and_small_features_keep_their_size():
    cards = scaled_cardinalities(0.01)
    assert len(cards) == 26
    for real, scaled in zip(CRITEO_KAGGLE_CARDINALITIES, cards):
        assert scaled == (real if real <= 100 else max(100, round(real * 0.01)))
    assert max(cards) == 101_312


def test_splits_positive_rate_and_yardsticks(synth):
    out, summary = synth
    assert summary.rows == {"train": 16_000, "valid": 2_000, "test": 2_000}
    assert 0.22 < summary.positive_rate < 0.28
    # Embedding quality decides the AUC: the true latents beat their cluster centres, which beat
    # latents taken from other rows; the dense features alone are far from the ceiling.
    assert summary.auc_ceiling > summary.auc_cluster_centres + 0.02
    assert summary.auc_cluster_centres > summary.auc_random_embeddings + 0.1
    assert summary.auc_ceiling > summary.auc_dense_only + 0.15
    test = pq.read_table(out / "test")
    assert roc_auc(test.column("label").to_numpy(), test.column("truth_logit").to_numpy()) == \
        pytest.approx(summary.auc_ceiling, abs=1e-6)


def test_written_spec_prepares_with_zipf_counts_and_multi_valued_lengths(synth, tmp_path):
    out, _ = synth
    ds = prepare_dataset(load_dataset_spec(out / "dataset.yaml"), tmp_path / "work")
    assert ds.feature_names == [f"C{i}" for i in range(1, 27)] + ["M1"]
    assert ds.num_rows("train") == 16_000 and len(ds.dense_names) == 13
    counts = ds.counts("C3").numpy()[:-1]
    assert np.all(np.diff(counts) <= 0) and counts[0] > 50 * np.median(counts)
    lengths = next(ds.batches("train", 512)).sparse_features["M1"].lengths()
    assert lengths.min() >= 1 and lengths.max() > 1


def test_cli_synth_and_inspect_print_the_yardsticks(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["data", "synth", "--out", str(out), "--rows", "2000", "--scale", "0.001",
                 "--quiet"]) == 0
    assert main(["data", "inspect", "--spec", str(out / "dataset.yaml"),
                 "--work-dir", str(tmp_path / "w")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("ceiling (true logit)") == 2
    assert re.search(r"train +1,600 rows, positive rate 0\.2", printed)
