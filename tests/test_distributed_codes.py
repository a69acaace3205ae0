"""Sharded MEC code tables on 2 and 3 real gloo ranks (CPU): the owner remaps ids.

Codes row_wise (each rank holds a block of rows) or table_wise (one rank holds the table), under
codebooks planned data_parallel, table_wise, row_wise or column_wise: outputs equal the unsharded
module (sum and mean pooling, weighted ids, empty bags, a rank with no ids, ids on every owner),
training equals unsharded training, and the state dict shows the codes as ShardedTensors.
One spawned group per world size runs every check.
"""

import pytest
from dist_harness import assert_check, run_ranks
from dist_workers import codes_body

SUM, MEAN = "SUM", "MEAN"


def cases(world_size: int) -> list[tuple[str, ...]]:
    """Every combination on 2 ranks; on 3 (3 processes on CI's 2 cores) the ones where a third
    owner matters: row-wise codes under each codebook sharding, pooling variants, training."""
    codebook_kinds = ["data_parallel", "table_wise", "row_wise"]
    if world_size == 2:  # 8-wide codebooks split 4-wide over 2 ranks at most
        codebook_kinds.append("column_wise")
    out = [("forward", kind, "row_wise", SUM, "plain") for kind in codebook_kinds]
    out += [
        # TorchRec cannot row-wise shard mean-pooled MEC codebooks (see docs/sharding.md)
        ("forward", "table_wise", "row_wise", MEAN, "plain"),
        ("forward", "data_parallel", "row_wise", SUM, "weighted"),
        ("forward", "data_parallel", "table_wise", MEAN, "plain"),
        ("training", "data_parallel", "row_wise"),
        ("training", "row_wise", "table_wise"),
        ("state_dict", "data_parallel", "row_wise"),
        ("load_tables", "table_wise", "row_wise"),
        ("planner",),
        ("export", "row_wise", "row_wise"),
        ("pipeline", "table_wise", "row_wise"),
    ]
    out += [("bad_plans",), ("fetch_mixed",)]
    if world_size == 2:
        out += [("forward", kind, "table_wise", SUM, "plain") for kind in codebook_kinds[:3]]
        out += [
            ("forward", "table_wise", "table_wise", MEAN, "weighted"),
            ("training", "table_wise", "row_wise"),
            ("state_dict", "data_parallel", "table_wise"),
            ("export", "data_parallel", "table_wise"),
        ]
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["2_ranks", "3_ranks"])
def group(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    world_size = request.param
    out = tmp_path_factory.mktemp(f"codes{world_size}")
    return world_size, run_ranks(codes_body, world_size, out, cases(world_size), timeout_s=240)


def names(world_size: int, check: str) -> list[str]:
    found = [":".join(c) for c in cases(world_size) if c[0] == check]
    assert found, f"no {check!r} case on {world_size} ranks"
    return found


def test_sharded_codes_forward_equals_unsharded_module(group: tuple) -> None:
    world_size, results = group
    for name in names(world_size, "forward"):
        assert_check(results, name)


def test_training_with_sharded_codes_equals_unsharded_training(group: tuple) -> None:
    world_size, results = group
    for name in names(world_size, "training"):
        assert_check(results, name)


def test_load_mec_state_fills_each_rank_with_its_code_rows(group: tuple) -> None:
    world_size, results = group
    for name in names(world_size, "load_tables"):
        assert_check(results, name)


def test_state_dict_shows_sharded_codes_as_full_size_sharded_tensors(group: tuple) -> None:
    world_size, results = group
    for name in names(world_size, "state_dict"):
        assert_check(results, name)


def test_planner_made_plan_with_sharded_codes_serves_like_the_unsharded_module(
    group: tuple,
) -> None:
    _, results = group
    assert_check(results, "planner")


def test_gathered_state_of_sharded_codes_exports_the_unsharded_artifact(group: tuple) -> None:
    world_size, results = group
    for name in names(world_size, "export"):
        assert_check(results, name)


def test_train_pipeline_sparse_dist_runs_sharded_codes(group: tuple) -> None:
    world_size, results = group
    for name in names(world_size, "pipeline"):
        assert_check(results, name)


def test_codes_plan_entries_that_do_not_fit_the_tables_are_refused_by_name(group: tuple) -> None:
    world_size, results = group
    for name in names(world_size, "bad_plans"):
        assert_check(results, name)


def test_one_exchange_serves_tables_of_other_widths_dtypes_and_fewer_rows_than_ranks(
    group: tuple,
) -> None:
    world_size, results = group
    for name in names(world_size, "fetch_mixed"):
        assert_check(results, name)
