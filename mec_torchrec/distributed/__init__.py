"""Distributed MEC: the sharder, planner helpers and loading after DistributedModelParallel."""

from mec_torchrec.distributed.loading import load_mec_state
from mec_torchrec.distributed.planner import (
    MECShardingPlanner,
    MECStorageReservation,
    codebook_tables,
    make_planner,
    mec_modules,
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
    "ShardedMECEmbeddingBagCollection",
    "codebook_tables",
    "get_default_sharders",
    "load_mec_state",
    "make_planner",
    "mec_modules",
    "replicated_bytes",
]
