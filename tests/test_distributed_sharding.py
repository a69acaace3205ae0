"""MEC sharder on 2 real gloo ranks (CPU): every plan kind serves, trains and pipelines correctly.

One spawned group runs every check (spawning and importing torchrec costs seconds per process);
each test below asserts one of its recorded checks on both ranks.
"""

import pytest
from dist_harness import assert_check, run_ranks
from dist_models import HAND_PLANS
from dist_workers import sharding_body

KINDS = [*HAND_PLANS, "planner"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    return run_ranks(sharding_body, 2, tmp_path_factory.mktemp("sharding"), KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_forward_equals_unsharded_module(results: list[dict[str, str]], kind: str) -> None:
    assert_check(results, f"forward[{kind}]")


@pytest.mark.parametrize("kind", KINDS)
def test_training_changes_codebooks_identically_across_replicas_and_freezes_codes(
    results: list[dict[str, str]], kind: str
) -> None:
    assert_check(results, f"training[{kind}]")


@pytest.mark.parametrize("kind", ["table_wise", "planner"])
def test_train_pipeline_sparse_dist_matches_unsharded_first_step(
    results: list[dict[str, str]], kind: str
) -> None:
    assert_check(results, f"pipeline[{kind}]")


@pytest.mark.parametrize("kind", ["table_wise", "row_wise"])
def test_fisher_collector_on_a_sharded_collection_sums_every_ranks_samples(
    results: list[dict[str, str]], kind: str
) -> None:
    assert_check(results, f"fisher[{kind}]")


def test_dmp_from_meta_zero_fills_codes_until_loaded(results: list[dict[str, str]]) -> None:
    assert_check(results, "zero_codes_before_loading")


def test_load_mec_state_fills_codes_and_codebook_shards_from_compressed_tables(
    results: list[dict[str, str]],
) -> None:
    assert_check(results, "load_compressed_tables")


def test_codes_of_a_module_built_on_each_rank_are_rank_0s_after_sharding(
    results: list[dict[str, str]],
) -> None:
    assert_check(results, "codes_broadcast_from_rank_0")
