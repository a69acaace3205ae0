"""Small MEC models, batches and plans shared by the distributed tests (no process groups here)."""

import dataclasses

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import Topology
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_wise,
)
from torchrec.distributed.sharding_plan import get_default_sharders as torchrec_default_sharders
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.modules.embedding_configs import PoolingType

from mec_torchrec.distributed import MECEmbeddingBagCollectionSharder, make_planner
from mec_torchrec.distributed.codes import codes_key, codes_sharding
from mec_torchrec.modules import MECEmbeddingBagCollection, MECTableConfig
from mec_torchrec.quantize import CompressedTable

LR = 0.5
BATCH_SIZE = 8
#: Two compressed tables (one with two features) and one full table. Codebook sub-dims are 8 so
#: column-wise shards stay 4-wide on 2 ranks (FBGEMM's fused kernel needs dim % 4 == 0).
TABLES = [
    EmbeddingBagConfig(name="t_a", num_embeddings=97, embedding_dim=16, feature_names=["f_a", "f_a2"]),
    EmbeddingBagConfig(name="t_b", num_embeddings=61, embedding_dim=16, feature_names=["f_b"]),
    EmbeddingBagConfig(name="t_c", num_embeddings=23, embedding_dim=8, feature_names=["f_c"]),
]
COMPRESSION = {"t_a": MECTableConfig(num_subspaces=2, codebook_size=8),
               "t_b": MECTableConfig(num_subspaces=2, codebook_size=16)}
FEATURES = [f for t in TABLES for f in t.feature_names]
HAND_PLANS = ["data_parallel", "table_wise", "row_wise", "column_wise"]


def compressed_tables(seed: int) -> dict[str, CompressedTable]:
    """Random codes and codebooks for every compressed table in `TABLES`, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in TABLES:
        cfg = COMPRESSION.get(t.name)
        if cfg is None:
            continue
        codes = torch.randint(0, cfg.codebook_size, (t.num_embeddings, cfg.num_subspaces), generator=g)
        sub_dim = t.embedding_dim // cfg.num_subspaces
        codebooks = torch.randn(cfg.num_subspaces, cfg.codebook_size, sub_dim, generator=g)
        out[t.name] = CompressedTable(codes, codebooks)
    return out


def reference_mec(seed: int) -> MECEmbeddingBagCollection:
    """A CPU MEC module with codes, codebooks and the full table all drawn from `seed`."""
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION)
    for name, table in compressed_tables(seed).items():
        mec.load_compressed(name, table)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        weight = mec.codebooks.embedding_bags["t_c"].weight
        weight.copy_(torch.randn(weight.shape, generator=g))
    return mec


class TinyModel(nn.Module):
    """MEC embeddings -> linear head -> BCE; returns (loss, logits) as TrainPipelineSparseDist wants.

    The embedding module is called directly on `batch.sparse_features` so the pipeline finds it.
    """

    def __init__(self, sparse: nn.Module, device: torch.device | None = None) -> None:
        super().__init__()
        self.sparse = sparse
        width = sum(t.embedding_dim * len(t.feature_names) for t in TABLES)
        self.head = nn.Linear(width, 1, device=device)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        # By name, as TorchRec's DLRM does: sharded outputs come in sharding order.
        pooled = self.sparse(batch.sparse_features).to_dict()
        logits = self.head(torch.cat([pooled[f] for f in FEATURES], dim=1)).squeeze(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, logits.detach()


def reference_model(seed: int) -> TinyModel:
    model = TinyModel(reference_mec(seed))
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g) * 0.1)
        model.head.bias.zero_()
    return model


def meta_model(kernel: str = "auto") -> TinyModel:
    """The same model on the meta device: what DMP shards without allocating full tensors."""
    meta = torch.device("meta")
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION, device=meta, kernel=kernel)
    return TinyModel(mec, device=meta)


def batch(seed: int, batch_size: int = BATCH_SIZE) -> Batch:
    """A random batch over `FEATURES` (0-3 ids per bag, empty bags included)."""
    g = torch.Generator().manual_seed(seed)
    sizes = {f: t.num_embeddings for t in TABLES for f in t.feature_names}
    lengths = torch.randint(0, 4, (len(FEATURES), batch_size), generator=g)
    values = [
        torch.randint(0, sizes[f], (int(lengths[i].sum()),), generator=g)
        for i, f in enumerate(FEATURES)
    ]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES, values=torch.cat(values), lengths=lengths.flatten()
    )
    return Batch(
        dense_features=torch.zeros(batch_size, 1),
        sparse_features=kjt,
        labels=torch.randint(0, 2, (batch_size,), generator=g).float(),
    )


def sharders() -> list[ModuleSharder[nn.Module]]:
    """TorchRec's defaults + the MEC sharder with a known fused optimizer (exact SGD, `LR`)."""
    ebc_sharder = EmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}
    )
    return [*torchrec_default_sharders(), MECEmbeddingBagCollectionSharder(ebc_sharder)]


def plan(kind: str, world_size: int, pg: torch.distributed.ProcessGroup | None = None) -> ShardingPlan:
    """A plan for `meta_model().sparse`: every inner table sharded as `kind`, or by the planner."""
    model = meta_model()
    if kind == "planner":
        planner = make_planner(Topology(world_size=world_size, compute_device="cpu"), BATCH_SIZE)
        if pg is None:
            return planner.plan(model, sharders())
        return planner.collective_plan(model, sharders(), pg)
    generators = {
        "data_parallel": lambda i: data_parallel(),
        "table_wise": lambda i: table_wise(rank=i % world_size),
        "row_wise": lambda i: row_wise(),
        "column_wise": lambda i: column_wise(ranks=list(range(world_size))),
    }[kind]
    mec_sharder = sharders()[-1]
    names = list(mec_sharder.shardable_parameters(model.sparse))
    module_plan = construct_module_sharding_plan(
        model.sparse,
        per_param_sharding={name: generators(i) for i, name in enumerate(names)},
        sharder=mec_sharder,
        local_size=world_size,
        world_size=world_size,
        device_type="cpu",
    )
    return ShardingPlan({"sparse": module_plan})


# -- sharded code tables (tests/test_distributed_codes*.py) --------------------------------------

#: Compressed tables of `TABLES`, whose codes a codes plan places.
COMPRESSED = list(COMPRESSION)


def variant_tables(pooling: PoolingType) -> list[EmbeddingBagConfig]:
    """`TABLES` with every table pooled by `pooling`."""
    return [dataclasses.replace(t, pooling=pooling) for t in TABLES]


def variant_mec(
    seed: int | None, pooling: PoolingType, weighted: bool, device: torch.device | None = None
) -> MECEmbeddingBagCollection:
    """`reference_mec(seed)` with another pooling and/or weighted input (not filled if None)."""
    mec = MECEmbeddingBagCollection(
        variant_tables(pooling), COMPRESSION, device=device, is_weighted=weighted
    )
    if seed is not None:
        reference = reference_mec(seed)
        mec.load_state_dict(reference.state_dict())
    return mec


def weighted(features: KeyedJaggedTensor, seed: int) -> KeyedJaggedTensor:
    """`features` with a random positive weight per id."""
    g = torch.Generator().manual_seed(seed)
    return KeyedJaggedTensor(
        keys=features.keys(),
        values=features.values(),
        lengths=features.lengths(),
        weights=torch.rand(features.values().numel(), generator=g) + 0.5,
    )


def spread_features(batch_size: int = BATCH_SIZE, empty: bool = False) -> KeyedJaggedTensor:
    """Ids spread evenly over each table (both ends and every row block of 2 or 3 ranks), bags
    of 0-4 ids with empty ones; every bag empty if `empty`."""
    sizes = {f: t.num_embeddings for t in TABLES for f in t.feature_names}
    pattern = torch.tensor([4, 0, 1, 3, 0, 2, 4, 1] * batch_size)[:batch_size]
    lengths = torch.zeros_like(pattern) if empty else pattern
    values = [
        torch.linspace(0, sizes[f] - 1, int(lengths.sum())).round().long() for f in FEATURES
    ]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES, values=torch.cat(values), lengths=lengths.repeat(len(FEATURES))
    )


def with_codes(
    base: ShardingPlan, codes_kind: str, world_size: int, owner: int = 1
) -> ShardingPlan:
    """`base` plus entries placing every compressed table's codes `codes_kind` (table_wise on
    rank `owner`, row_wise over all ranks)."""
    sizes = {t.name: t.num_embeddings for t in TABLES}
    ranks = [owner % world_size] if codes_kind == "table_wise" else list(range(world_size))
    module_plan = base.plan["sparse"]
    for name in COMPRESSED:
        module_plan[codes_key(name)] = codes_sharding(
            sizes[name], COMPRESSION[name].num_subspaces, codes_kind, ranks
        )
    return base
