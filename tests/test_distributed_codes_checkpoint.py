"""Checkpoints of sharded MEC code tables across world sizes, and their export.

Saved on 2 ranks (codes row_wise) -> loaded on 3 (row_wise) and on 1 (replicated); saved on 3
(codes table_wise) -> loaded on 1 and on 2 (row_wise); saved on 1 (replicated) -> loaded on 2
(table_wise). Each load starts from a fresh model (zero codes, random codebooks) and must
reproduce the reference model's output, codes and codebooks. The 2-rank checkpoint exports to
the same artifact as the unsharded module.
"""

from pathlib import Path

import pytest
import torch
from dist_harness import assert_check, run_ranks
from dist_models import TABLES, batch, reference_mec
from dist_workers import codes_dcp_body

from mec_torchrec.export import MECInferenceEmbeddingBagCollection, export_model
from mec_torchrec.export.reader import read_manifest, read_table

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
SEEDS = {"on_two": 21, "on_three": 23, "on_one": 29}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list]]:
    root = tmp_path_factory.mktemp("codes_dcp")
    two, three, one = (str(root / name) for name in ("on_two", "on_three", "on_one"))
    results = {
        "two": run_ranks(
            codes_dcp_body, 2, root / "r1", [("save", two, "row_wise", "row_wise", SEEDS["on_two"])]
        ),
        "three": run_ranks(
            codes_dcp_body,
            3,
            root / "r2",
            [
                ("load", two, "table_wise", "row_wise", SEEDS["on_two"]),
                ("save", three, "data_parallel", "table_wise", SEEDS["on_three"]),
            ],
        ),
        "one": run_ranks(
            codes_dcp_body,
            1,
            root / "r3",
            [
                ("load", two, "data_parallel", "data_parallel", SEEDS["on_two"]),
                ("load", three, "table_wise", "data_parallel", SEEDS["on_three"]),
                ("save", one, "table_wise", "data_parallel", SEEDS["on_one"]),
            ],
        ),
        "two_again": run_ranks(
            codes_dcp_body,
            2,
            root / "r4",
            [
                ("load", three, "data_parallel", "row_wise", SEEDS["on_three"]),
                ("load", one, "row_wise", "table_wise", SEEDS["on_one"]),
            ],
        ),
    }
    return root, results


def test_checkpoint_saved_on_two_ranks_loads_on_three_and_one(checkpoints: tuple) -> None:
    _, results = checkpoints
    assert_check(results["two"], "save:on_two")
    assert_check(results["three"], "load:on_two")
    assert_check(results["one"], "load:on_two")


def test_checkpoint_saved_on_three_ranks_loads_on_one_and_two(checkpoints: tuple) -> None:
    _, results = checkpoints
    assert_check(results["three"], "save:on_three")
    assert_check(results["one"], "load:on_three")
    assert_check(results["two_again"], "load:on_three")


def test_checkpoint_saved_on_one_rank_loads_into_sharded_codes_on_two(checkpoints: tuple) -> None:
    _, results = checkpoints
    assert_check(results["one"], "save:on_one")
    assert_check(results["two_again"], "load:on_one")


def test_export_of_sharded_codes_checkpoint_equals_export_of_unsharded_module(
    checkpoints: tuple, tmp_path: Path
) -> None:
    root, results = checkpoints
    assert_check(results["two"], "save:on_two")
    features = {t.name: list(t.feature_names) for t in TABLES}
    export_model(root / "on_two", tmp_path / "sharded", feature_names=features)
    reference = reference_mec(SEEDS["on_two"])
    export_model(reference, tmp_path / "unsharded")
    manifests = {p: read_manifest(tmp_path / p) for p in ("sharded", "unsharded")}
    for got, want in zip(manifests["sharded"].tables, manifests["unsharded"].tables):
        assert got.name == want.name
        got_tensors = read_table(tmp_path / "sharded", got, verify=True)
        want_tensors = read_table(tmp_path / "unsharded", want, verify=True)
        assert got_tensors.keys() == want_tensors.keys(), got.name
        for key, tensor in want_tensors.items():
            assert torch.equal(got_tensors[key], tensor), (got.name, key)
    serving = MECInferenceEmbeddingBagCollection.load(tmp_path / "sharded")
    kjt = batch(3).sparse_features
    torch.testing.assert_close(
        serving(kjt).values(), reference(kjt).values().detach(), atol=1e-6, rtol=0
    )
