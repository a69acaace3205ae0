"""The MEC sharder's contract, checked without a process group: what it plans, what it refuses,
and how load_mec_state reports tables it cannot place."""

import dataclasses

import pytest
import torch
from dist_models import COMPRESSION, TABLES, compressed_tables, reference_mec
from torchrec import EmbeddingBagConfig, PoolingType
from torchrec.distributed.sharding_plan import (
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv

from mec_torchrec.distributed import MECEmbeddingBagCollectionSharder, load_mec_state
from mec_torchrec.distributed.data_parallel import fusable_tables
from mec_torchrec.modules import MECEmbeddingBagCollection, MECTableConfig

CPU = torch.device("cpu")
NO_PG = ShardingEnv(world_size=2, rank=0, pg=None)


def test_shardable_parameters_are_the_inner_codebook_ebc_tables() -> None:
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION, device="meta")
    params = MECEmbeddingBagCollectionSharder().shardable_parameters(mec)
    assert list(params) == ["t_a@0", "t_a@1", "t_b@0", "t_b@1", "t_c"]
    assert params["t_a@0"] is mec.codebooks.embedding_bags["t_a@0"].weight


def test_sharder_refuses_sharding_types_it_does_not_support() -> None:
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION)
    sharder = MECEmbeddingBagCollectionSharder()
    per_table = {name: table_wise(rank=0) for name in sharder.shardable_parameters(mec)}
    per_table["t_a@0"] = table_row_wise(host_index=0)
    plan = construct_module_sharding_plan(
        mec, per_table, sharder=sharder,
        local_size=2, world_size=2, device_type="cpu",
    )
    with pytest.raises(ValueError, match="table_row_wise"):
        sharder.shard(mec, plan, NO_PG, CPU)


def test_sharder_refuses_row_wise_for_mean_pooled_codebooks() -> None:
    tables = [EmbeddingBagConfig(name="t", num_embeddings=50, embedding_dim=16,
                                 feature_names=["f"], pooling=PoolingType.MEAN)]
    mec = MECEmbeddingBagCollection(tables, {"t": MECTableConfig(2, 8)})
    sharder = MECEmbeddingBagCollectionSharder()
    plan = construct_module_sharding_plan(
        mec, {"t@0": row_wise(), "t@1": table_wise(rank=0)}, sharder=sharder,
        local_size=2, world_size=2, device_type="cpu",
    )
    with pytest.raises(ValueError, match="'t@0' uses MEAN pooling"):
        sharder.shard(mec, plan, NO_PG, CPU)


def test_load_mec_state_fills_an_unsharded_module_from_compressed_tables() -> None:
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION)
    load_mec_state(mec, compressed_tables(7))
    want = reference_mec(7)
    for name in COMPRESSION:
        assert torch.equal(getattr(mec.codes, name), getattr(want.codes, name))


def test_load_mec_state_names_a_table_no_module_holds() -> None:
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION)
    with pytest.raises(KeyError, match="'t_zz'"):
        load_mec_state(mec, {"t_zz": compressed_tables(7)["t_a"]})


def test_load_mec_state_rejects_a_state_dict_without_the_codes() -> None:
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION)
    state = {k: v for k, v in reference_mec(7).state_dict().items() if not k.startswith("codes.")}
    with pytest.raises(RuntimeError, match="codes.t_a"):
        load_mec_state(mec, state)


def test_load_mec_state_rejects_mixed_tensors_and_tables() -> None:
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION)
    state = {"codes.t_a": torch.zeros(97, 2), "t_b": compressed_tables(7)["t_b"]}
    with pytest.raises(TypeError, match="mixes"):
        load_mec_state(mec, state)


def _data_parallel_plan(mec: MECEmbeddingBagCollection, **overrides) -> dict:
    sharder = MECEmbeddingBagCollectionSharder()
    per_table = {name: data_parallel() for name in sharder.shardable_parameters(mec)}
    per_table.update(overrides)
    return construct_module_sharding_plan(
        mec, per_table, sharder=sharder, local_size=2, world_size=2, device_type="cpu",
    )


def test_fused_path_serves_compressed_tables_with_all_codebooks_data_parallel() -> None:
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION)
    plan = _data_parallel_plan(mec, **{"t_b@1": table_wise(rank=0)})
    assert fusable_tables(mec, plan, CPU) == ["t_a"]


def test_fused_path_leaves_mean_pooled_weighted_and_tbe_modules_on_the_remap_path() -> None:
    mean = [dataclasses.replace(t, pooling=PoolingType.MEAN) for t in TABLES]
    for mec in (
        MECEmbeddingBagCollection(mean, COMPRESSION),
        MECEmbeddingBagCollection(TABLES, COMPRESSION, is_weighted=True),
        MECEmbeddingBagCollection(TABLES, COMPRESSION, kernel="tbe"),
    ):
        assert fusable_tables(mec, _data_parallel_plan(mec), CPU) == []
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION)
    assert fusable_tables(mec, _data_parallel_plan(mec), torch.device("cuda")) == []
