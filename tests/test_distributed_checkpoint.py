"""torch.distributed.checkpoint of a sharded MEC model, codes included, across world sizes.

2 ranks (row-wise) save -> 1 rank (table-wise) loads, then saves another model (data-parallel)
-> 2 ranks (column-wise) load. Each load starts from a fresh DMP model (zero codes, random
codebooks) and must reproduce the reference model's output and codes exactly.
"""


import pytest
from dist_harness import assert_check, run_ranks
from dist_workers import dcp_body

SEED_TWO_RANKS = 11
SEED_ONE_RANK = 13


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, str]]]:
    root = tmp_path_factory.mktemp("dcp")
    on_two, on_one = str(root / "on_two"), str(root / "on_one")
    return {
        "two": run_ranks(dcp_body, 2, root / "r1", [("save", on_two, "row_wise", SEED_TWO_RANKS)]),
        "one": run_ranks(
            dcp_body,
            1,
            root / "r2",
            [
                ("load", on_two, "table_wise", SEED_TWO_RANKS),
                ("save", on_one, "data_parallel", SEED_ONE_RANK),
            ],
        ),
        "two_again": run_ranks(
            dcp_body, 2, root / "r3", [("load", on_one, "column_wise", SEED_ONE_RANK)]
        ),
    }


def test_checkpoint_saved_on_two_ranks_loads_on_one(results: dict) -> None:
    assert_check(results["two"], "save:on_two")
    assert_check(results["one"], "load:on_two")


def test_checkpoint_saved_on_one_rank_loads_on_two(results: dict) -> None:
    assert_check(results["one"], "save:on_one")
    assert_check(results["two_again"], "load:on_one")
