"""A checkpoint written by 2 ranks with row-wise sharded codebooks exports whole and serves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_harness import assert_check, run_ranks
from dist_models import TABLES, batch, reference_mec
from dist_workers import dcp_body

from mec_torchrec.export import MECInferenceEmbeddingBagCollection, export_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
SEED = 17


def test_row_wise_sharded_checkpoint_exports_gathered_tables(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    results = run_ranks(dcp_body, 2, tmp_path / "ranks", [("save", str(checkpoint), "row_wise", SEED)])
    assert_check(results, "save:ckpt")
    features = {t.name: list(t.feature_names) for t in TABLES}
    export_model(checkpoint, tmp_path / "art", feature_names=features)
    serving = MECInferenceEmbeddingBagCollection.load(tmp_path / "art")
    reference = reference_mec(SEED)
    kjt = batch(3).sparse_features
    torch.testing.assert_close(serving(kjt).values(), reference(kjt).values().detach(),
                               atol=1e-6, rtol=0)
