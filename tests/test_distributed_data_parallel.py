"""Compressed tables with data-parallel codebooks pool through the fused kernel from raw ids,
and serve and train exactly as the remap + dense TBE path (`kernel="tbe"`) does, on 2 gloo ranks."""

import pytest
from dist_harness import assert_check, run_ranks
from dist_workers import data_parallel_body

KINDS = ["data_parallel", "planner"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    return run_ranks(data_parallel_body, 2, tmp_path_factory.mktemp("data_parallel"), KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_data_parallel_compressed_tables_take_the_fused_path(
    results: list[dict[str, str]], kind: str
) -> None:
    assert_check(results, f"path[{kind}]")


@pytest.mark.parametrize("kind", KINDS)
def test_fused_path_forward_equals_the_remap_path(results: list[dict[str, str]], kind: str) -> None:
    assert_check(results, f"forward[{kind}]")


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_path_training_equals_the_remap_path(
    results: list[dict[str, str]], kind: str, optimizer: str
) -> None:
    assert_check(results, f"training[{kind},{optimizer}]")


def test_fused_path_serves_a_module_of_compressed_tables_only(
    results: list[dict[str, str]],
) -> None:
    assert_check(results, "only_compressed_tables")
