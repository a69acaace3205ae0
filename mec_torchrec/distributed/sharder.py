"""Sharding a `MECEmbeddingBagCollection`: replicated or sharded codes, stock-sharded codebooks.

The MEC module is two halves around a stock `EmbeddingBagCollection`: `remap` turns raw ids into
code ids through the `codes` buffers, and `regroup` stitches the pooled sub-embeddings back into
the plain-EBC layout. Sharding keeps that shape:

    features --remap (local for replicated codes; on the owning rank for sharded ones,
                      see `codes.py`)--> code-id KJT
             --input dist / lookup / output dist (stock ShardedEmbeddingBagCollection)-->
             pooled sub-embeddings --merge sub-features--> KeyedTensor of the MEC features

As with TorchRec's own sharded EBC, the output's keys come in sharding order (each key's tensor is
exactly the unsharded module's): read it with `to_dict()` or `KeyedTensor.regroup`, as TorchRec's
DLRM does, never by position. That keeps the output free of copies when sub-features sit side by
side (see `regroup.py`).

Every learnable row lives in the inner `codebooks` EBC, so the stock EBC sharder does all the
distribution work and the planner plans the inner tables (`t@0 .. t@{L-1}`, full tables as-is).

On CPU, a compressed table whose codebooks are all data_parallel and whose codes are replicated
skips the remap and the stock lookup: the fused kernel pools it from raw ids, reading the
codebooks as views of the stock data-parallel lookup's weight (see `data_parallel.py`; a module
built with `kernel="tbe"` keeps the path above).
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import BaseEmbeddingSharder, KJTList
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.sharding_plan import get_default_sharders as _torchrec_default_sharders
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ModuleSharder,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardedModule,
    ShardingEnv,
    ShardingType,
)
from torchrec.distributed.utils import append_prefix
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from mec_torchrec.distributed.codes import (
    CODES_SHARDING_TYPES,
    RemoteCodeSource,
    ShardedCodes,
    split_plan,
)
from mec_torchrec.distributed.data_parallel import (
    FusedDataParallelTables,
    fusable_tables,
    held_by_dense_tbe,
)
from mec_torchrec.distributed.regroup import ShardedRegroup, regrouped
from mec_torchrec.modules import MECEmbeddingBagCollection

if TYPE_CHECKING:
    from mec_torchrec.quantize import CompressedTable

#: Codebook sharding types this sharder supports (and tests), data_parallel first: codebooks are
#: small, so replicating them removes both all-to-alls for compressed features.
SUPPORTED_SHARDING_TYPES: list[str] = [
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.ROW_WISE.value,
]


def _check_mean_pooling(
    module: MECEmbeddingBagCollection, plan: dict[str, ParameterSharding]
) -> None:
    # TorchRec's row-wise mean-pooling callback reads "a@b" feature names as shared features
    # ("feature@table") and fails on the sub-features "f@l" at the first forward: refuse up front.
    for config in module.codebooks.embedding_bag_configs():
        sharding = plan.get(config.name)
        if (
            sharding is not None
            and sharding.sharding_type == ShardingType.ROW_WISE.value
            and config.pooling == PoolingType.MEAN
            and any("@" in f for f in config.feature_names)
        ):
            raise ValueError(
                f"codebook table {config.name!r} uses MEAN pooling, which TorchRec cannot shard "
                "row_wise for MEC sub-features (their '@' names clash with its shared-feature "
                "naming); plan it data_parallel, table_wise or column_wise"
            )


def _broadcast_codes(codes: nn.Module, pg: dist.ProcessGroup) -> None:
    # A module built on each rank draws its own random codes; like DDP's initial parameter sync,
    # rank 0's copy wins so every replica remaps ids the same way.
    src = dist.get_global_rank(pg, 0)
    for buffer in codes.buffers():
        dist.broadcast(buffer, src=src, group=pg)


@dataclass
class MECEmbeddingBagCollectionContext(EmbeddingBagCollectionContext):
    """The stock context plus the ids the fused data-parallel path pools (see
    `data_parallel.py`), carried from `input_dist` to `compute` (pipelines keep one per batch)."""

    fused_input: tuple[torch.Tensor, torch.Tensor, int] | None = None
    fused_output: torch.Tensor | None = None


class ShardedMECEmbeddingBagCollection(
    ShardedModule[KJTList, list[torch.Tensor], KeyedTensor, EmbeddingBagCollectionContext]
):
    """Sharded counterpart of `MECEmbeddingBagCollection`.

    Children mirror the unsharded module so state dicts line up key for key:
    `codes` (the module's own buffer container, moved to `device`, one full copy per rank; a
    `ShardedCodes` holding each rank's rows when the plan shards some code tables) and
    `codebooks` (a `ShardedEmbeddingBagCollection` built by the stock sharder from the plan).
    Output: a `KeyedTensor` with the unsharded module's keys and per-key tensors, keys in sharding
    order (like TorchRec's sharded EBC; features of fused data-parallel tables last).

    Args:
        module: the unsharded MEC module (its `codes` container is reused, not copied).
        table_name_to_parameter_sharding: plan for the inner codebook tables.
        ebc_sharder: the stock sharder that shards `module.codebooks`.
        env: sharding environment.
        device: compute device; codes are placed here.
        module_fqn: fully qualified name of the MEC module in the model.
    """

    def __init__(
        self,
        module: MECEmbeddingBagCollection,
        table_name_to_parameter_sharding: dict[str, ParameterSharding],
        ebc_sharder: EmbeddingBagCollectionSharder,
        env: ShardingEnv,
        device: torch.device,
        module_fqn: str | None = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=ebc_sharder.qcomm_codecs_registry)
        self._env = env
        self._device = device
        codebook_plan, codes_plan = split_plan(table_name_to_parameter_sharding)
        unsupported = {
            name: ps.sharding_type
            for name, ps in codebook_plan.items()
            if ps.sharding_type not in SUPPORTED_SHARDING_TYPES
        }
        unsupported.update(
            (f"codes.{name}", ps.sharding_type)
            for name, ps in codes_plan.items()
            if ps.sharding_type not in CODES_SHARDING_TYPES
        )
        if unsupported:
            raise ValueError(
                f"MEC tables {unsupported} use unsupported sharding types; expected one of "
                f"{SUPPORTED_SHARDING_TYPES} for codebooks, {CODES_SHARDING_TYPES} for codes"
            )
        _check_mean_pooling(module, codebook_plan)
        self._code_source: RemoteCodeSource | None = None
        on_meta = any(b.is_meta for b in module.codes.buffers())
        if not on_meta and env.process_group is not None and env.world_size > 1:
            _broadcast_codes(module.codes, env.process_group)
        if any(ps.sharding_type != ShardingType.DATA_PARALLEL.value for ps in codes_plan.values()):
            if env.process_group is None:
                raise ValueError("sharded MEC code tables need a process group in the env")
            self.codes: nn.Module = ShardedCodes(
                module.codes, codes_plan, env.process_group, device
            )
            self._code_source = RemoteCodeSource(module, self.codes)
            # The sharded module keeps `module` alive (its remap); drop its full sharded codes.
            for name in self.codes.sharded_tables:
                full = getattr(module.codes, name)
                module.codes.register_buffer(name, full.to("meta"), persistent=True)
        else:
            # Meta codes stay meta here: DistributedModelParallel materializes (zero-fills) them
            # and load_mec_state / load_state_dict fills them afterwards.
            self.codes = module.codes if on_meta else module.codes.to(device)
        self.codebooks: ShardedEmbeddingBagCollection = ebc_sharder.shard(
            module.codebooks,
            codebook_plan,
            env=env,
            device=device,
            module_fqn=append_prefix(module_fqn or "", "codebooks"),
        )
        # remap/regroup read only the module's configuration and its `codes` container (shared
        # with self.codes above); the module is kept outside the nn.Module tree so its unsharded
        # codebooks are neither registered here nor saved twice.
        self._remap: Callable[..., KeyedJaggedTensor] = module.remap
        self._regroup = ShardedRegroup(module.regroup)
        tables = fusable_tables(module, codebook_plan, device) if self._code_source is None else []
        tables = held_by_dense_tbe(module, tables, self.codebooks)
        self._fused: FusedDataParallelTables | None = (
            FusedDataParallelTables(module, tables, self.codes, self.codebooks) if tables else None
        )

    @property
    def fused_tables(self) -> FusedDataParallelTables | None:
        """The compressed tables pooled by the fused kernel from raw ids, if any."""
        return self._fused

    def create_context(self) -> MECEmbeddingBagCollectionContext:
        return MECEmbeddingBagCollectionContext()

    def remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The code-id KJT of ``features`` (as the unsharded module's ``remap``), read locally
        from replicated codes or fetched from the ranks owning sharded ones (collective then)."""
        with torch.no_grad():
            return self._remap(features, self._code_source)

    def input_dist(  # type: ignore[override]
        self, ctx: EmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        """Remaps ids to code ids (`remap`), then runs the stock input all-to-all on code ids.

        Features of the fused data-parallel tables skip the remap: their ids wait in `ctx` for
        `compute`, and the stock lookup sees their sub-features as empty bags.
        """
        if self._fused is None:
            return self.codebooks.input_dist(ctx, self.remap(features))
        with torch.no_grad():
            stock, ctx.fused_input = self._fused.split(features)
        return self.codebooks.input_dist(ctx, stock)

    def compute(
        self, ctx: EmbeddingBagCollectionContext, dist_input: KJTList
    ) -> list[torch.Tensor]:
        dist_input = self._pool_fused(ctx, dist_input)
        return self.codebooks.compute(ctx, dist_input)

    def output_dist(
        self, ctx: EmbeddingBagCollectionContext, output: list[torch.Tensor]
    ) -> LazyAwaitable[KeyedTensor]:
        return self._with_regroup(ctx, self.codebooks.output_dist(ctx, output))

    def compute_and_output_dist(
        self, ctx: EmbeddingBagCollectionContext, input: KJTList
    ) -> LazyAwaitable[KeyedTensor]:
        input = self._pool_fused(ctx, input)
        return self._with_regroup(ctx, self.codebooks.compute_and_output_dist(ctx, input))

    def _pool_fused(self, ctx: EmbeddingBagCollectionContext, dist_input: KJTList) -> KJTList:
        if self._fused is None:
            return dist_input
        ctx.fused_output = self._fused.pool(ctx.fused_input)
        ctx.fused_input = None
        return self._fused.stock_input(dist_input)

    def _with_regroup(
        self, ctx: EmbeddingBagCollectionContext, pooled: LazyAwaitable[KeyedTensor]
    ) -> LazyAwaitable[KeyedTensor]:
        if self._fused is None:
            return regrouped(pooled, self._regroup)
        fused, ctx.fused_output = ctx.fused_output, None
        return regrouped(pooled, self._fused.merged(self._regroup, fused))

    def load_compressed(self, name: str, table: "CompressedTable") -> None:
        """Fills table `name`'s codes (every rank) and its codebook shards from `table`.

        Same verb as the unsharded module's; use it after DistributedModelParallel has wrapped the
        model (DMP zero-fills meta codes and does not copy the unsharded module's weights).
        """
        codes: torch.Tensor | None = getattr(self.codes, name, None)
        if codes is None:
            raise KeyError(f"no compressed table {name!r} in this MEC module")
        shape = (
            self.codes.full_shape(name)
            if isinstance(self.codes, ShardedCodes)
            else tuple(codes.shape)
        )
        if tuple(table.codes.shape) != shape:
            raise ValueError(
                f"table {name!r}: codes shape {tuple(table.codes.shape)}, expected "
                f"{shape} (rows, subspaces)"
            )
        state = {f"codes.{name}": table.codes}
        for subspace in range(table.codebooks.shape[0]):
            key = f"codebooks.embedding_bags.{name}@{subspace}.weight"
            state[key] = table.codebooks[subspace]
        result = self.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise KeyError(
                f"table {name!r}: keys {result.unexpected_keys} match no codes buffer or codebook "
                f"(expected {table.codebooks.shape[0]} subspaces)"
            )

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        # Every parameter lives in the sharded codebooks; DMP's DDP must leave them alone.
        yield from self.codebooks.sharded_parameter_names(append_prefix(prefix, "codebooks"))

    @property
    def unsharded_module_type(self) -> type[MECEmbeddingBagCollection]:
        return MECEmbeddingBagCollection


class MECEmbeddingBagCollectionSharder(BaseEmbeddingSharder[MECEmbeddingBagCollection]):
    """Sharder for `MECEmbeddingBagCollection`, wrapping the stock `EmbeddingBagCollectionSharder`.

    The planner sees the inner codebook tables as the module's shardable parameters, so plans
    are keyed by inner table name (`t@0`, ..., full tables by their own name) under the MEC
    module's fqn; `codes.<table>` entries place code tables (replicated, row_wise or table_wise,
    see `codes.py`), and `mec_torchrec.distributed.make_planner` chooses and reserves them.

    Args:
        ebc_sharder: the stock sharder to delegate to (pass one with `fused_params` to choose the
            fused optimizer); a default `EmbeddingBagCollectionSharder` if None.
        qcomm_codecs_registry: quantized communication codecs, as for the stock sharder.

    Example::

        model = DistributedModelParallel(
            model, env=env, plan=plan, sharders=get_default_sharders()
        )
    """

    def __init__(
        self,
        ebc_sharder: EmbeddingBagCollectionSharder | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._ebc_sharder: EmbeddingBagCollectionSharder = ebc_sharder or (
            EmbeddingBagCollectionSharder(qcomm_codecs_registry=self.qcomm_codecs_registry)
        )

    def shard(
        self,
        module: MECEmbeddingBagCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedMECEmbeddingBagCollection:
        return ShardedMECEmbeddingBagCollection(
            module,
            params,
            ebc_sharder=self._ebc_sharder,
            env=env,
            device=device or torch.device("cuda"),
            module_fqn=module_fqn,
        )

    def shardable_parameters(self, module: MECEmbeddingBagCollection) -> dict[str, nn.Parameter]:
        return self._ebc_sharder.shardable_parameters(module.codebooks)

    def sharding_types(self, compute_device_type: str) -> list[str]:
        """What the planner may choose from: like the stock sharder, row_wise on CUDA only.

        Row-wise plans made by hand also work on CPU, but gloo's reduce-scatter of pooled
        outputs is slow there, and TorchRec's planner does not model that cost.
        """
        if compute_device_type == "cuda":
            return list(SUPPORTED_SHARDING_TYPES)
        return [t for t in SUPPORTED_SHARDING_TYPES if t != ShardingType.ROW_WISE.value]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return self._ebc_sharder.compute_kernels(sharding_type, compute_device_type)

    @property
    def fused_params(self) -> dict[str, Any] | None:
        return self._ebc_sharder.fused_params

    @property
    def module_type(self) -> type[MECEmbeddingBagCollection]:
        return MECEmbeddingBagCollection

    @property
    def sharded_module_type(self) -> type[ShardedMECEmbeddingBagCollection]:
        return ShardedMECEmbeddingBagCollection


def get_default_sharders() -> list[ModuleSharder[nn.Module]]:
    """TorchRec's default sharders plus `MECEmbeddingBagCollectionSharder`.

    The one-line swap for an existing pipeline: pass this wherever
    `torchrec.distributed.sharding_plan.get_default_sharders()` was passed (the planner and
    `DistributedModelParallel`).
    """
    return [*_torchrec_default_sharders(), MECEmbeddingBagCollectionSharder()]
