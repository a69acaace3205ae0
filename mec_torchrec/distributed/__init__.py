"""Distributed MEC: the sharder, planner helpers and loading after DistributedModelParallel."""

from mec_torchrec.distributed.codes import ShardedCodes, codes_key, codes_sharding
from mec_torchrec.distributed.gather import gathered_state_dict
from mec_torchrec.distributed.loading import load_mec_state
from mec_torchrec.distributed.planner import (
    MECShardingPlanner,
    MECStorageReservation,
    codebook_tables,
    codes_bytes_per_rank,
    describe_codes,
    make_planner,
    mec_modules,
    place_codes,
    replicated_bytes,
)
from mec_torchrec.distributed.sharder import (
    SUPPORTED_SHARDING_TYPES,
    MECEmbeddingBagCollectionSharder,
    ShardedMECEmbeddingBagCollection,
    get_default_sharders,
)

__all__ = [
    "SUPPORTED_SHARDING_TYPES",
    "MECEmbeddingBagCollectionSharder",
    "MECShardingPlanner",
    "MECStorageReservation",
    "ShardedCodes",
    "ShardedMECEmbeddingBagCollection",
    "codebook_tables",
    "codes_bytes_per_rank",
    "codes_key",
    "codes_sharding",
    "describe_codes",
    "gathered_state_dict",
    "get_default_sharders",
    "load_mec_state",
    "make_planner",
    "mec_modules",
    "place_codes",
    "replicated_bytes",
]
