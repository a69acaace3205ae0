"""Planning MEC modules: plan keys, sharding types proposed, and budgets that need the codes counted.

Single process, meta-device modules: nothing the size of a Criteo table is allocated.
"""

import pytest
import torch
from dist_models import meta_model, sharders
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
from torchrec.distributed.sharding_plan import get_default_sharders as torchrec_default_sharders

from mec_torchrec.distributed import (
    SUPPORTED_SHARDING_TYPES,
    MECEmbeddingBagCollectionSharder,
    MECStorageReservation,
    get_default_sharders,
    make_planner,
    replicated_bytes,
)
from mec_torchrec.modules import MECEmbeddingBagCollection, MECTableConfig

MiB = 2**20
#: Criteo Kaggle cardinalities (MEC.md); tables of >= 100k rows are compressed (L=4, K=256).
CRITEO = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
          14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]


class Sparse(nn.Module):
    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.sparse = embeddings


def criteo_tables(dim: int = 64) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t_C{i}", num_embeddings=n, embedding_dim=dim, feature_names=[f"C{i}"])
        for i, n in enumerate(CRITEO, start=1)
    ]


def criteo_mec(dim: int = 64) -> Sparse:
    tables = criteo_tables(dim)
    compression = {t.name: MECTableConfig(4, 256) for t in tables if t.num_embeddings >= 100_000}
    return Sparse(MECEmbeddingBagCollection(tables, compression, device="meta"))


def cpu_topology(ddr_bytes: int) -> Topology:
    return Topology(world_size=2, compute_device="cpu", ddr_cap=ddr_bytes)


def test_default_sharders_are_torchrec_defaults_plus_mec() -> None:
    ours = [type(s) for s in get_default_sharders()]
    assert ours[:-1] == [type(s) for s in torchrec_default_sharders()]
    assert ours[-1] is MECEmbeddingBagCollectionSharder


def test_plan_is_keyed_by_mec_module_and_inner_tables() -> None:
    plan = make_planner(cpu_topology(1024 * MiB), batch_size=8).plan(meta_model(), sharders())
    assert set(plan.plan) == {"sparse"}
    assert set(plan.plan["sparse"]) == {
        "t_a@0", "t_a@1", "t_b@0", "t_b@1", "t_c", "codes.t_a", "codes.t_b"
    }


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dim", [64, 128])
def test_planner_puts_codebooks_data_parallel_and_uses_supported_types_only(
    device: str, dim: int
) -> None:
    topology = Topology(world_size=2, compute_device=device, hbm_cap=80 * 1024 * MiB)
    plan = make_planner(topology, batch_size=4096).plan(criteo_mec(dim), get_default_sharders())
    module_plan = plan.plan["sparse"]
    assert {ps.sharding_type for ps in module_plan.values()} <= set(SUPPORTED_SHARDING_TYPES)
    codebooks = {name: ps.sharding_type for name, ps in module_plan.items() if "@" in name}
    assert len(codebooks) == 7 * 4
    assert set(codebooks.values()) == {"data_parallel"}


def test_cpu_planner_never_proposes_row_wise() -> None:
    planner = make_planner(cpu_topology(1024 * MiB), batch_size=4096, codebook_sharding_types=[])
    plan = planner.plan(criteo_mec(), get_default_sharders())
    assert "row_wise" not in {ps.sharding_type for ps in plan.plan["sparse"].values()}


def test_caller_constraints_win_over_the_data_parallel_codebook_default() -> None:
    constraints = {"t_a@0": ParameterConstraints(sharding_types=["table_wise"])}
    planner = make_planner(cpu_topology(1024 * MiB), batch_size=8, constraints=constraints)
    module_plan = planner.plan(meta_model(), sharders()).plan["sparse"]
    assert module_plan["t_a@0"].sharding_type == "table_wise"
    assert module_plan["t_a@1"].sharding_type == "data_parallel"
    assert set(constraints) == {"t_a@0"}  # the caller's dict is not modified


def test_replicated_bytes_counts_codes_of_a_meta_module() -> None:
    compressed = [n for n in CRITEO if n >= 100_000]
    assert replicated_bytes(criteo_mec()) == sum(compressed) * 4  # uint8 codes, L = 4


def test_mec_plan_fits_a_budget_the_full_tables_do_not() -> None:
    budget = cpu_topology(1024 * MiB)  # 2 GiB in all; the full tables are 8.05 GiB
    full = Sparse(EmbeddingBagCollection(criteo_tables(), device="meta"))
    with pytest.raises(PlannerError, match="(?i)insufficient|storage|capacity"):
        EmbeddingShardingPlanner(topology=budget, batch_size=4096, debug=False).plan(
            full, torchrec_default_sharders()
        )
    plan = make_planner(budget, batch_size=4096).plan(criteo_mec(), get_default_sharders())
    assert len(plan.plan["sparse"]) == 7 * 4 + 19 + 7  # codebooks, full tables, codes


def test_stock_reservation_misses_the_codes_and_mec_reservation_rejects() -> None:
    budget = cpu_topology(150 * MiB)  # codes alone are 128 MiB per rank, plus tables and KJTs
    model = criteo_mec()
    EmbeddingShardingPlanner(topology=budget, batch_size=4096, debug=False).plan(
        model, get_default_sharders()
    )  # accepted: the stock planner never sees the codes
    replicated = {f"t_C{i}": "data_parallel" for i, n in enumerate(CRITEO, 1) if n >= 100_000}
    with pytest.raises(PlannerError, match="MEC codes need"):
        make_planner(budget, batch_size=4096, codes_sharding=replicated).plan(
            model, get_default_sharders()
        )


def test_mec_reservation_subtracts_codes_from_every_rank() -> None:
    topology = cpu_topology(1024 * MiB)
    model = criteo_mec()
    stock = HeuristicalStorageReservation(percentage=0.15)
    ours = MECStorageReservation()
    base = stock.reserve(topology, 4096, model, get_default_sharders())
    with_codes = ours.reserve(topology, 4096, model, get_default_sharders())
    for before, after in zip(base.devices, with_codes.devices):
        assert before.storage.ddr - after.storage.ddr == replicated_bytes(model)
    assert ours.codes_bytes == replicated_bytes(model) > 0


def test_planner_input_is_not_allocated() -> None:
    model = criteo_mec()
    make_planner(cpu_topology(1024 * MiB), batch_size=4096).plan(model, get_default_sharders())
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_tables_with_an_optimizer_in_backward_are_kept_off_data_parallel() -> None:
    model = meta_model()
    bags = model.sparse.codebooks.embedding_bags
    _apply_optimizer_in_backward(torch.optim.SGD, [bags["t_a@0"].weight], {"lr": 0.1})
    planner = make_planner(cpu_topology(1024 * MiB), batch_size=8)
    module_plan = planner.plan(model, sharders()).plan["sparse"]
    assert module_plan["t_a@0"].sharding_type in {"table_wise", "column_wise"}
    assert module_plan["t_a@1"].sharding_type == "data_parallel"
