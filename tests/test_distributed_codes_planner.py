"""Placing MEC codes by the per-rank memory budget: replicated while they fit, else sharded.

Single process, meta-device modules: the 10-billion-id table is never allocated.
"""

import pytest
from dist_models import meta_model, sharders
from test_distributed_planner import CRITEO, MiB, Sparse, cpu_topology, criteo_mec
from torchrec import EmbeddingBagConfig
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError

from mec_torchrec.distributed import (
    MECStorageReservation,
    codes_sharding,
    make_planner,
    replicated_bytes,
)
from mec_torchrec.distributed.planner import describe_codes
from mec_torchrec.modules import MECEmbeddingBagCollection, MECTableConfig

GiB = 2**30
TEN_BILLION = 10_000_000_000


def huge_table_model() -> Sparse:
    tables = [
        EmbeddingBagConfig(
            name="t_ids", num_embeddings=TEN_BILLION, embedding_dim=128, feature_names=["ids"]
        ),
        EmbeddingBagConfig(
            name="t_small", num_embeddings=1000, embedding_dim=128, feature_names=["small"]
        ),
    ]
    compression = {"t_ids": MECTableConfig(4, 256)}
    return Sparse(MECEmbeddingBagCollection(tables, compression, device="meta"))


def codes_entries(plan) -> dict[str, tuple[str, list[int]]]:
    return {
        name: (ps.sharding_type, ps.ranks)
        for name, ps in plan.plan["sparse"].items()
        if name.startswith("codes.")
    }


def test_codes_that_fit_comfortably_stay_replicated() -> None:
    plan = make_planner(cpu_topology(1024 * MiB), batch_size=8).plan(meta_model(), sharders())
    assert codes_entries(plan) == {
        "codes.t_a": ("data_parallel", [0, 1]),
        "codes.t_b": ("data_parallel", [0, 1]),
    }
    assert describe_codes(plan) == ["sparse.t_a codes: replicated", "sparse.t_b codes: replicated"]


def test_a_ten_billion_id_table_is_sharded_row_wise_over_every_gpu() -> None:
    topology = Topology(world_size=8, compute_device="cuda", hbm_cap=80 * GiB)
    reservation = MECStorageReservation()
    model = huge_table_model()
    plan = make_planner(topology, batch_size=4096, reservation=reservation).plan(model, sharders())
    assert codes_entries(plan) == {"codes.t_ids": ("row_wise", list(range(8)))}
    assert describe_codes(plan) == ["sparse.t_ids codes: row_wise over 8 ranks"]
    assert "codes.t_ids" in str(plan)  # the plan's own printout lists it with its shards
    assert replicated_bytes(model) == TEN_BILLION * 4
    assert reservation.codes_bytes == TEN_BILLION * 4 // 8  # what each rank holds, not 40 GB


def test_only_the_largest_tables_are_sharded_until_the_rest_fit() -> None:
    # Criteo Kaggle codes: 128 MiB replicated; a quarter of 300 MiB is 75 MiB, so the two
    # largest tables (10.1M and 8.4M rows, 71 MiB) are sharded and the rest (57 MiB) replicated.
    plan = make_planner(cpu_topology(300 * MiB), batch_size=4096).plan(criteo_mec(), sharders())
    sharded = {n for n, (kind, _) in codes_entries(plan).items() if kind == "row_wise"}
    assert sharded == {"codes.t_C3", "codes.t_C12"}
    assert len(codes_entries(plan)) == 7


def test_budget_that_rejects_replicated_codes_plans_with_sharded_ones() -> None:
    budget = cpu_topology(200 * MiB)  # 128 MiB of replicated codes + tables do not fit
    replicated = {f"t_C{i}": "data_parallel" for i, n in enumerate(CRITEO, 1) if n >= 100_000}
    with pytest.raises(PlannerError, match="(?i)insufficient"):
        make_planner(budget, batch_size=4096, codes_sharding=replicated).plan(
            criteo_mec(), sharders()
        )
    plan = make_planner(budget, batch_size=4096).plan(criteo_mec(), sharders())
    assert "row_wise" in {kind for kind, _ in codes_entries(plan).values()}


def test_overrides_win_and_table_wise_goes_to_the_least_loaded_rank() -> None:
    overrides = {"t_a": "table_wise", "t_b": "table_wise"}
    reservation = MECStorageReservation()
    planner = make_planner(
        cpu_topology(1024 * MiB), batch_size=8, codes_sharding=overrides, reservation=reservation
    )
    plan = planner.plan(meta_model(), sharders())
    assert codes_entries(plan) == {
        "codes.t_a": ("table_wise", [0]),
        "codes.t_b": ("table_wise", [1]),
    }
    assert describe_codes(plan) == [
        "sparse.t_a codes: table_wise on rank 0",
        "sparse.t_b codes: table_wise on rank 1",
    ]
    assert reservation.codes_bytes == 97 * 2  # rank 0 holds t_a (97 x 2 uint8), rank 1 t_b


def test_unknown_override_names_the_table() -> None:
    planner = make_planner(
        cpu_topology(1024 * MiB), batch_size=8, codes_sharding={"t_z": "row_wise"}
    )
    with pytest.raises(ValueError, match="t_z"):
        planner.plan(meta_model(), sharders())


def test_codes_sharding_refuses_types_other_than_replicated_row_and_table_wise() -> None:
    with pytest.raises(ValueError, match="column_wise"):
        codes_sharding(97, 2, "column_wise", [0, 1])


def test_row_wise_codes_sharding_splits_rows_in_ceil_blocks_and_skips_empty_ranks() -> None:
    sharding = codes_sharding(4, 2, "row_wise", [0, 1, 2])  # blocks of 2: ranks 0 and 1 only
    shards = [
        (s.shard_offsets, s.shard_sizes, str(s.placement)) for s in sharding.sharding_spec.shards
    ]
    assert shards == [([0, 0], [2, 2], "rank:0/cpu"), ([2, 0], [2, 2], "rank:1/cpu")]
    assert sharding.ranks == [0, 1]


def test_codes_constraints_choose_like_overrides_and_reach_no_stock_table() -> None:
    constraints = {
        "codes.t_a": ParameterConstraints(sharding_types=["row_wise"]),
        "t_a@0": ParameterConstraints(sharding_types=["table_wise"]),
    }
    planner = make_planner(cpu_topology(1024 * MiB), batch_size=8, constraints=constraints)
    plan = planner.plan(meta_model(), sharders())
    assert codes_entries(plan)["codes.t_a"] == ("row_wise", [0, 1])
    assert codes_entries(plan)["codes.t_b"] == ("data_parallel", [0, 1])
    assert plan.plan["sparse"]["t_a@0"].sharding_type == "table_wise"


def test_a_list_of_allowed_types_is_chosen_from_by_the_budget() -> None:
    # 300 MiB per rank: the two largest Criteo tables' codes must leave the replicas; allowed
    # only table_wise or replicated, they go table-wise, one per rank.
    allowed = {"t_C3": ["data_parallel", "table_wise"], "t_C12": ["data_parallel", "table_wise"]}
    planner = make_planner(cpu_topology(300 * MiB), batch_size=4096, codes_sharding=allowed)
    entries = codes_entries(planner.plan(criteo_mec(), sharders()))
    assert entries["codes.t_C3"][0] == entries["codes.t_C12"][0] == "table_wise"
    assert {entries["codes.t_C3"][1][0], entries["codes.t_C12"][1][0]} == {0, 1}
