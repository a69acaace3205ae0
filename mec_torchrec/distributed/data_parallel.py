"""Compressed tables with data-parallel codebooks, pooled by the fused kernel from raw ids.

When every codebook of a compressed table is planned data_parallel and its codes are replicated,
each rank holds everything the table needs, so the sharded module can do what the unsharded one
does on CPU: run the fused kernel (``modules/fused.py``) on the raw ids, reading ``codes[id, l]``
inside the pooling loop, with no remap and no dense TBE lookup of those features.

The kernel reads each codebook as a *view* of the flat weight of the stock data-parallel lookup
(FBGEMM's dense TBE inside the sharded codebook EBC), so the parameter, its state-dict entry,
checkpoints, DDP's gradient all-reduce and the dense optimizer are untouched: the views'
gradients accumulate into that flat weight. The stock lookup still sees the sub-features
``f@0 .. f@{L-1}`` (its input dist needs every feature) but with empty bags, and their all-zero
columns are dropped from its output; a data-parallel lookup that serves only such sub-features
runs on one empty sample (its output stays in the backward graph, without a gradient, for DDP).

Everything else (full tables, other sharding types, sharded codes, mean pooling, per-id weights,
CUDA, ``kernel="tbe"``) keeps the remap path.
"""

import torch
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.batched_embedding_kernel import BatchedDenseEmbeddingBag
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.types import ParameterSharding, ShardingType
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from mec_torchrec.distributed.regroup import ShardedRegroup
from mec_torchrec.modules import MECEmbeddingBagCollection
from mec_torchrec.modules import fused as _fused
from mec_torchrec.modules import remap as _remap
from mec_torchrec.modules.layout import MECLayout, build_layout, sub_name

#: Per dense TBE: (module, first and last flat element used, (start, rows, dim) per codebook
#: relative to the first element, in flat order).
_WeightGroup = tuple[torch.nn.Module, int, int, list[tuple[int, int, int]]]
#: (part, first column, end column) runs, kept names, kept dims, parts with no kept column.
_ColumnPlan = tuple[list[tuple[int, int, int]], list[str], list[int], list[int]]


def fusable_tables(
    module: MECEmbeddingBagCollection,
    codebook_plan: dict[str, ParameterSharding],
    device: torch.device,
) -> list[str]:
    """The compressed tables of ``module`` the fused data-parallel path can serve, table order
    (the caller rules out modules with sharded codes)."""
    if device.type != "cpu" or module.kernel == "tbe" or module.is_weighted():
        return []
    dp = ShardingType.DATA_PARALLEL.value
    out = []
    for config in module.embedding_bag_configs():
        mec = module.compression.get(config.name)
        if mec is None or config.pooling != PoolingType.SUM:
            continue
        plans = [codebook_plan.get(sub_name(config.name, s)) for s in range(mec.num_subspaces)]
        if all(p is not None and p.sharding_type == dp for p in plans):
            out.append(config.name)
    if out and not _fused.available():
        return []
    return out


def held_by_dense_tbe(
    module: MECEmbeddingBagCollection, tables: list[str], codebooks: ShardedEmbeddingBagCollection
) -> list[str]:
    """Those of ``tables`` whose codebooks all sit whole in a dense TBE of ``codebooks``."""
    dense = _dense_tables(codebooks)
    out = []
    for name in tables:
        subspaces = module.compression[name].num_subspaces
        if all(sub_name(name, s) in dense for s in range(subspaces)):
            out.append(name)
    return out


def _dense_tables(
    codebooks: ShardedEmbeddingBagCollection,
) -> dict[str, tuple[torch.nn.Module, int]]:
    """Inner table name -> (its dense TBE module, its index there) over every lookup."""
    out = {}
    for lookup in codebooks._lookups:
        inner = lookup.module if isinstance(lookup, DistributedDataParallel) else lookup
        for emb in getattr(inner, "_emb_modules", []):
            if isinstance(emb, BatchedDenseEmbeddingBag):
                for t, table in enumerate(emb.config.embedding_tables):
                    out[table.name] = (emb.emb_module, t)
    return out


def _sub_layout(module: MECEmbeddingBagCollection, tables: list[str]) -> MECLayout | None:
    chosen = set(tables)
    configs = [c for c in module.embedding_bag_configs() if c.name in chosen]
    if not configs:
        return None
    return build_layout(configs, {n: m for n, m in module.compression.items() if n in chosen})


class FusedDataParallelTables:
    """The fused path for ``tables`` (see the module docstring): splits the input, pools the
    fused features, and merges their columns into the stock output.

    Args:
        module: the unsharded MEC module (configuration and ``remap`` helpers).
        tables: compressed tables to serve here (``fusable_tables``).
        codes: the sharded module's codes container (replicated codes of ``tables``).
        codebooks: the sharded codebook EBC whose data-parallel dense TBE holds the codebooks.
    """

    def __init__(
        self,
        module: MECEmbeddingBagCollection,
        tables: list[str],
        codes: torch.nn.Module,
        codebooks: ShardedEmbeddingBagCollection,
    ) -> None:
        self._module = module
        self._codes = codes
        outer = module._layout
        fused = _sub_layout(module, tables)
        rest = _sub_layout(
            module, [c.name for c in module.embedding_bag_configs() if c.name not in set(tables)]
        )
        assert fused is not None
        self._fused, self._rest = fused, rest
        self._plan = _fused.build_plan(fused)
        index = {f: i for i, f in enumerate(outer.features)}
        self._fused_features = [index[f] for f in fused.features]
        self._rest_features = [index[f] for f in rest.features] if rest is not None else []
        self._order = torch.tensor(self._rest_features + self._fused_features, dtype=torch.int32)
        self._stock_features = (
            rest.lookup_features if rest is not None else []
        ) + fused.lookup_features
        self._dropped = set(fused.lookup_features)
        self._weights = self._weight_groups(codebooks, fused)
        # Per stock output layout (its names): kept column runs, kept names and dims, and the
        # parts left with no kept column; built on the first step, reused by every other.
        self._column_plans: dict[tuple[str, ...], _ColumnPlan] = {}
        self._codebooks = codebooks
        # Data-parallel lookups that see fused sub-features only: they run on one empty sample.
        self._idle = [
            i
            for i, (kind, sharding) in enumerate(
                zip(codebooks._sharding_types, codebooks._embedding_shardings)
            )
            if kind == ShardingType.DATA_PARALLEL.value
            and set(sharding.feature_names()) <= self._dropped
        ]
        #: Calls of the fused kernel, for tests and benchmarks.
        self.calls = 0

    @staticmethod
    def _weight_groups(
        codebooks: ShardedEmbeddingBagCollection, fused: MECLayout
    ) -> tuple[list[_WeightGroup], list[int]]:
        dense = _dense_tables(codebooks)
        by_module: dict[int, list[tuple[int, int, int, int]]] = {}
        modules = {}
        for position, table in enumerate(fused.inner_tables):
            tbe, t = dense[table.name]
            rows, dim = tbe.embedding_specs[t]
            if (rows, dim) != (table.num_embeddings, table.embedding_dim):
                raise ValueError(
                    f"codebook {table.name!r}: dense TBE holds {rows} x {dim}, expected "
                    f"{table.num_embeddings} x {table.embedding_dim} (a full data-parallel copy)"
                )
            modules[id(tbe)] = tbe
            start = int(tbe.weights_physical_offsets[t])
            by_module.setdefault(id(tbe), []).append((start, rows, dim, position))
        groups, positions = [], []
        for key, entries in by_module.items():
            entries.sort()
            first = entries[0][0]
            last = entries[-1][0] + entries[-1][1] * entries[-1][2]
            groups.append(
                (modules[key], first, last, [(s - first, r, d) for s, r, d, _ in entries])
            )
            positions += [p for *_, p in entries]
        # positions[k]: the fused layout's inner table of the k-th view, views in group order.
        order = sorted(range(len(positions)), key=positions.__getitem__)
        return groups, order

    def weights(self) -> list[torch.Tensor]:
        """The codebooks in the fused layout's inner order, as views of the TBEs' flat weights
        (taken per step: the flat weight may be replaced, e.g. when DMP materializes it)."""
        groups, order = self._weights
        views: list[torch.Tensor] = []
        for tbe, first, last, entries in groups:
            flat = tbe.weights.narrow(0, first, last - first)
            sizes, keep, position = [], [], 0
            for start, rows, dim in entries:
                if start > position:
                    sizes.append(start - position)
                keep.append((len(sizes), rows, dim))
                sizes.append(rows * dim)
                position = start + rows * dim
            pieces = flat.split(sizes)
            views += [pieces[k].view(rows, dim) for k, rows, dim in keep]
        return [views[k] for k in order]

    def split(
        self, features: KeyedJaggedTensor
    ) -> tuple[KeyedJaggedTensor, tuple[torch.Tensor, torch.Tensor, int]]:
        """(the stock EBC's input: other features remapped, fused sub-features as empty bags;
        the fused features' checked ids, lengths and batch size for ``pool``)."""
        values, lengths, _, stride, length_per_key = self._module._checked_tensors(features)
        num_rest = sum(length_per_key[f] for f in self._rest_features)
        lengths, values, _ = torch.ops.fbgemm.permute_2D_sparse_data(
            self._order, lengths.view(len(length_per_key), stride), values, None, values.numel()
        )
        lengths = lengths.view(-1)
        rest_lengths = lengths[: len(self._rest_features) * stride]
        fused = (values[num_rest:], lengths[len(self._rest_features) * stride :], stride)
        if self._rest is not None:
            rest_values, rest_lengths, _ = _remap.remap_values(
                values[:num_rest],
                rest_lengths,
                None,
                stride,
                [length_per_key[f] for f in self._rest_features],
                [getattr(self._codes, name) for name in self._rest.compressed],
                self._rest.table_codes,
                self._rest.table_num_features,
                self._rest.lookup_sources,
            )
        else:
            rest_values = values[:0].to(torch.int64)
        empty = torch.zeros(len(self._fused.lookup_features) * stride, dtype=lengths.dtype)
        stock = KeyedJaggedTensor(
            keys=self._stock_features,
            values=rest_values,
            lengths=torch.cat([rest_lengths, empty]),
            stride=stride,
        )
        return stock, fused

    def stock_input(self, dist_input: KJTList) -> KJTList:
        """``dist_input`` with the idle data-parallel lookups' inputs cut to one empty sample.

        Their outputs are dropped (``merge``), so only their batch size costs: the dense TBE
        would write B all-zero rows. Not done when the stock awaitable itself concatenates the
        per-sharding outputs (mean-pooling callbacks), which needs equal batch sizes.
        """
        if not self._idle or self._codebooks._has_mean_pooling_callback:
            return dist_input
        out = list(dist_input)
        for i in self._idle:
            features = out[i]
            out[i] = KeyedJaggedTensor(
                keys=features.keys(),
                values=features.values()[:0],
                lengths=features.lengths().new_zeros(len(features.keys())),
                stride=1,
            )
        return KJTList(out)

    def pool(self, fused: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
        """Pooled fused sub-features [B, sum of their dims], in the fused layout's lookup order."""
        values, lengths, stride = fused
        self.calls += 1
        return _fused.fused_pooled_lookup(
            values,
            lengths,
            None,
            stride,
            [getattr(self._codes, name) for name in self._fused.compressed],
            self.weights(),
            self._plan,
        )

    def merged(self, regroup: ShardedRegroup, pooled: torch.Tensor) -> "MergedRegroup":
        """``regroup`` applied to the stock parts with the fused columns put in."""
        return MergedRegroup(self, regroup, pooled)

    def merge(
        self, parts: list[torch.Tensor], names: list[str], dims: list[int], pooled: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[str], list[int]]:
        """The stock parts without the fused sub-features' (empty-bag) columns, plus ``pooled``."""
        key = tuple(names)
        cached = self._column_plans.get(key)
        if cached is None:
            runs = self._column_plan(parts, names, dims)
            used = {p for p, _, _ in runs}
            cached = self._column_plans[key] = (
                runs,
                [n for n in names if n not in self._dropped],
                [d for n, d in zip(names, dims) if n not in self._dropped],
                [p for p in range(len(parts)) if p not in used],
            )
        plan, kept_names, kept_dims, idle_parts = cached
        kept = [
            parts[p] if (start, end) == (0, parts[p].shape[1]) else parts[p][:, start:end]
            for p, start, end in plan
        ]
        dropped = [parts[p] for p in idle_parts]
        if dropped:
            pooled = _KeepInGraph.apply(pooled, *dropped)
        return (
            [*kept, pooled],
            [*kept_names, *self._fused.lookup_features],
            [*kept_dims, *self._fused.lookup_dims],
        )

    def _column_plan(
        self, parts: list[torch.Tensor], names: list[str], dims: list[int]
    ) -> list[tuple[int, int, int]]:
        """(part, first column, end column) of each run of kept columns."""
        plan, n = [], 0
        for p, part in enumerate(parts):
            column, width = 0, part.shape[1]
            run = None
            while column < width:
                keep = names[n] not in self._dropped
                if keep and run is None:
                    run = column
                if not keep and run is not None:
                    plan.append((p, run, column))
                    run = None
                column += dims[n]
                n += 1
            if run is not None:
                plan.append((p, run, width))
        return plan


class _KeepInGraph(torch.autograd.Function):
    """Identity on ``pooled`` that keeps ``dropped`` (stock outputs of fused sub-features only) in
    the backward graph without a gradient: DDP (static graph) waits for its hook on the stock
    data-parallel lookup's output in the first backward to enqueue its gradient all-reduce."""

    @staticmethod
    def forward(ctx, pooled: torch.Tensor, *dropped: torch.Tensor) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        ctx.num_dropped = len(dropped)
        return pooled.view_as(pooled)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (grad, *([None] * ctx.num_dropped))


class MergedRegroup:
    """A ``ShardedRegroup`` that first swaps the fused sub-features' columns in."""

    def __init__(
        self, tables: FusedDataParallelTables, regroup: ShardedRegroup, pooled: torch.Tensor
    ) -> None:
        self._tables = tables
        self._regroup = regroup
        self._pooled = pooled

    def __call__(self, parts: list[torch.Tensor], names: list[str], dims: list[int]) -> KeyedTensor:
        return self._regroup(*self._tables.merge(parts, names, dims, self._pooled))

    def keyed(self, pooled: KeyedTensor) -> KeyedTensor:
        return self([pooled.values()], pooled.keys(), pooled.length_per_key())
