"""Code tables sharded across ranks: placement in the plan, local shards, the remote remap.

Replicated codes cost N * L bytes on every rank. A table whose codes do not fit is sharded
instead, row-wise (rank r holds a contiguous block of rows) or table-wise (one rank holds all of
them), and the id -> code ids remap runs on the rank that owns the ids:

    ids --bucketize by owner, all-to-all--> owner: codes[id - shard start]
        --all-to-all back--> the sender's code ids, in its ids' order

after which the module's usual path (the codebook EBC's input dist, lookup, output dist) runs
unchanged, so pooling, per-id weights, mean pooling and codebook gradients are exactly those of
replicated codes. The price is two id-sized all-to-alls per batch (ids out, L codes back; each
distinct id of a rank's batch once) and a counts all-to-all before them, all blocking.

Placement lives in the sharding plan, beside the codebook tables, under the key
``codes.<table>`` with sharding type ``row_wise``, ``table_wise`` or ``data_parallel``
(replicated; the same as no entry), so it is broadcast with the plan and shows in its printout.
"""

from dataclasses import dataclass
from math import ceil
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import (
    ShardedTensorMetadata,
    TensorProperties,
)
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.sharding_plan import placement as torchrec_placement
from torchrec.distributed.types import ParameterSharding, ShardingType

#: Plan keys of code tables start with this; the rest is the table name.
CODES_PREFIX = "codes."
#: What the compute-kernel column of a plan printout shows for a code table.
CODES_KERNEL = "mec_remap"
CODES_SHARDING_TYPES = (
    ShardingType.DATA_PARALLEL.value,
    ShardingType.ROW_WISE.value,
    ShardingType.TABLE_WISE.value,
)


def codes_key(table: str) -> str:
    """The plan key of table ``table``'s codes: ``"t_C3"`` -> ``"codes.t_C3"``."""
    return CODES_PREFIX + table


def codes_sharding(
    num_rows: int,
    num_subspaces: int,
    sharding_type: str,
    ranks: list[int],
    device_type: str = "cpu",
) -> ParameterSharding:
    """The plan entry placing a [num_rows, num_subspaces] code table.

    ``row_wise``: contiguous blocks of ceil(N / len(ranks)) rows on ``ranks`` in order (trailing
    ranks may hold none); ``table_wise``: every row on ``ranks[0]``; ``data_parallel``: a full
    copy on every rank (replicated, the default for a table without an entry).
    """
    if sharding_type not in CODES_SHARDING_TYPES:
        raise ValueError(
            f"codes sharding type {sharding_type!r}; expected one of {CODES_SHARDING_TYPES}"
        )
    if not ranks:
        raise ValueError("codes sharding needs at least one rank")
    if sharding_type == ShardingType.DATA_PARALLEL.value:
        return ParameterSharding(sharding_type, CODES_KERNEL, ranks=list(ranks))
    if sharding_type == ShardingType.TABLE_WISE.value:
        ranks = ranks[:1]
    block = ceil(num_rows / len(ranks))
    shards = []
    for i, rank in enumerate(ranks):
        start = min(i * block, num_rows)
        rows = min(block, num_rows - start)
        if rows > 0:
            shards.append(
                ShardMetadata(
                    shard_offsets=[start, 0],
                    shard_sizes=[rows, num_subspaces],
                    placement=f"rank:{rank}/{device_type}",
                )
            )
    return ParameterSharding(
        sharding_type,
        CODES_KERNEL,
        ranks=[int(s.placement.rank()) for s in shards],
        sharding_spec=EnumerableShardingSpec(shards),
    )


def split_plan(
    params: dict[str, ParameterSharding],
) -> tuple[dict[str, ParameterSharding], dict[str, ParameterSharding]]:
    """A MEC module's plan -> (codebook tables' entries, code tables' entries by table name)."""
    codebooks = {k: v for k, v in params.items() if not k.startswith(CODES_PREFIX)}
    codes = {k[len(CODES_PREFIX) :]: v for k, v in params.items() if k.startswith(CODES_PREFIX)}
    return codebooks, codes


def describe(table: str, sharding: ParameterSharding | None) -> str:
    """One printout line: ``"t_C3 codes: row_wise over 4 ranks"`` (or replicated, table_wise)."""
    kind = sharding.sharding_type if sharding is not None else ShardingType.DATA_PARALLEL.value
    if kind == ShardingType.ROW_WISE.value:
        return f"{table} codes: row_wise over {len(sharding.ranks or [])} ranks"
    if kind == ShardingType.TABLE_WISE.value:
        return f"{table} codes: table_wise on rank {(sharding.ranks or [None])[0]}"
    return f"{table} codes: replicated"


@dataclass(frozen=True)
class _Placement:
    """Where one sharded code table's rows live: row blocks (start, rows, rank) in row order."""

    shape: tuple[int, int]
    dtype: torch.dtype
    blocks: tuple[tuple[int, int, int], ...]

    def local(self, rank: int) -> tuple[int, int]:
        """(first row, rows) this rank holds; (0, 0) if none."""
        mine = [(start, rows) for start, rows, r in self.blocks if r == rank]
        return mine[0] if mine else (0, 0)


def _placement(
    table: str, shape: tuple[int, int], dtype: torch.dtype, sharding: ParameterSharding, world: int
) -> _Placement:
    spec = sharding.sharding_spec
    if not isinstance(spec, EnumerableShardingSpec):
        raise TypeError(f"plan entry {codes_key(table)!r}: {sharding.sharding_type} needs shards")
    blocks = sorted(
        (int(s.shard_offsets[0]), int(s.shard_sizes[0]), int(s.placement.rank()))
        for s in spec.shards
    )
    position = 0
    for start, rows, rank in blocks:
        if start != position or rank >= world:
            break
        position += rows
    owners = [rank for _, _, rank in blocks]
    widths = {int(s.shard_sizes[1]) for s in spec.shards}
    if position != shape[0] or widths != {shape[1]} or len(set(owners)) != len(owners):
        raise ValueError(
            f"plan entry {codes_key(table)!r}: shards {[tuple(b) for b in blocks]} (start, rows, "
            f"rank) must tile the {shape[0]} x {shape[1]} codes in order, one shard per rank "
            f"of {world}"
        )
    return _Placement(shape, dtype, tuple(blocks))


class ShardedCodes(nn.Module):
    """A MEC module's code tables, some replicated and some sharded; one buffer per table.

    A replicated table's buffer is the whole [N, L] table; a sharded one's is this rank's rows.
    ``state_dict`` shows sharded tables as ``ShardedTensor`` s of the full shape (so
    ``torch.distributed.checkpoint`` reshards them across world sizes); ``load_state_dict`` takes
    either those or full tensors, from which each rank keeps its own rows.

    Args:
        codes: the unsharded module's codes container ([N, L] buffers, possibly on meta).
        placements: table name -> plan entry; tables absent (or data_parallel) stay replicated.
        pg: the process group whose ranks the plan names.
        device: where the buffers live.
    """

    def __init__(
        self,
        codes: nn.Module,
        placements: dict[str, ParameterSharding],
        pg: dist.ProcessGroup,
        device: torch.device,
    ) -> None:
        super().__init__()
        self._pg = pg
        self._rank = dist.get_rank(pg)
        self._world = dist.get_world_size(pg)
        full = dict(codes.named_buffers())
        unknown = sorted(set(placements) - set(full))
        if unknown:
            raise KeyError(f"plan places codes of {unknown}, which are not compressed tables")
        self._sharded: dict[str, _Placement] = {}
        for name, buffer in full.items():
            sharding = placements.get(name)
            if sharding is None or sharding.sharding_type == ShardingType.DATA_PARALLEL.value:
                local = torch.zeros_like(buffer, device=device) if buffer.is_meta else buffer
                self.register_buffer(name, local.to(device), persistent=True)
                continue
            placement = _placement(name, tuple(buffer.shape), buffer.dtype, sharding, self._world)
            self._sharded[name] = placement
            start, rows = placement.local(self._rank)
            if buffer.is_meta:
                local = torch.zeros((rows, buffer.shape[1]), dtype=buffer.dtype, device=device)
            else:
                local = buffer[start : start + rows].to(device, copy=True)
            self.register_buffer(name, local, persistent=True)
        self._register_state_dict_hook(_to_sharded_tensors)
        self._register_load_state_dict_pre_hook(self._to_local_rows)

    @property
    def sharded_tables(self) -> list[str]:
        """Names of the tables whose codes are sharded (not replicated)."""
        return list(self._sharded)

    def full_shape(self, name: str) -> tuple[int, int]:
        """[N, L] of table ``name``, wherever its rows live."""
        placement = self._sharded.get(name)
        return placement.shape if placement is not None else tuple(getattr(self, name).shape)

    def local_rows(self, name: str) -> tuple[int, int]:
        """(first row, rows) of table ``name`` held here ((0, N) for a replicated table)."""
        placement = self._sharded.get(name)
        if placement is None:
            return 0, getattr(self, name).shape[0]
        return placement.local(self._rank)

    def sharded_tensor(self, name: str) -> ShardedTensor:
        """Table ``name``'s codes as a ``ShardedTensor`` over the process group (no copy)."""
        placement = self._sharded[name]
        local: torch.Tensor = getattr(self, name)
        local_size = get_local_size(self._world)

        def where(rank: int) -> str:
            # This rank's shard sits where its tensor is; others where TorchRec would put them.
            if rank == self._rank:
                return f"rank:{rank}/{local.device}"
            return torchrec_placement(local.device.type, rank, local_size)

        metadata = [
            ShardMetadata([start, 0], [rows, placement.shape[1]], where(rank))
            for start, rows, rank in placement.blocks
        ]
        mine = [Shard(local, m) for m in metadata if m.placement.rank() == self._rank]
        properties = TensorProperties(dtype=placement.dtype, requires_grad=False)
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            mine,
            ShardedTensorMetadata(metadata, torch.Size(placement.shape), properties),
            process_group=self._pg,
        )

    def _to_local_rows(self, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for name, placement in self._sharded.items():
            key = prefix + name
            value = state.get(key)
            if isinstance(value, ShardedTensor):
                shards = value.local_shards()
                start, rows = placement.local(self._rank)
                if not shards:
                    state[key] = torch.empty((0, placement.shape[1]), dtype=placement.dtype)
                    continue
                offset = int(shards[0].metadata.shard_offsets[0])
                if len(shards) != 1 or offset != start:
                    raise ValueError(
                        f"{key}: local shards at rows {[s.metadata.shard_offsets for s in shards]}"
                        f", expected one at row {start}"
                    )
                state[key] = shards[0].tensor
            elif isinstance(value, torch.Tensor):
                if tuple(value.shape) != placement.shape:
                    raise ValueError(
                        f"{key}: shape {tuple(value.shape)}, expected the full table "
                        f"{placement.shape} (rows, subspaces)"
                    )
                start, rows = placement.local(self._rank)
                state[key] = value[start : start + rows]

    def fetch(self, ids: list[torch.Tensor], tables: list[str]) -> list[torch.Tensor]:
        """Codes rows [len(ids[k]), L] of ids ``ids[k]`` of sharded table ``tables[k]``.

        Collective: every rank of the group calls it with the same ``tables`` (its own ids, maybe
        none). Each distinct (table, id) travels once to its owner, which reads its row and sends
        it back; repeated ids (skewed batches) cost nothing more on the wire.
        """
        device = ids[0].device if ids else torch.device("cpu")
        placements = [self._sharded[t] for t in tables]
        widths = [p.shape[1] for p in placements]
        dtypes = {p.dtype for p in placements}
        wire = dtypes.pop() if len(dtypes) == 1 else torch.int32
        # Row g of the tables laid end to end: table k's id i is bases[k] + i.
        bases = [0]
        for p in placements:
            bases.append(bases[-1] + p.shape[0])
        owners, rows_global = [], []
        for k, (part, placement) in enumerate(zip(ids, placements)):
            starts = torch.tensor([b[0] for b in placement.blocks], device=device)
            ranks = torch.tensor([b[2] for b in placement.blocks], device=device)
            owners.append(ranks[torch.searchsorted(starts, part, right=True) - 1])
            rows_global.append(part + bases[k])
        # Sorted distinct keys owner * total + row: grouped by owner for the all-to-all, each
        # (table, id) once.
        total = bases[-1]
        keys, inverse = torch.unique(
            torch.cat(owners) * total + torch.cat(rows_global), return_inverse=True
        )
        edges = torch.arange(self._world + 1, device=device) * total
        send_counts = torch.searchsorted(keys, edges).diff()
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self._pg)
        send_sizes, recv_sizes = send_counts.tolist(), recv_counts.tolist()
        requests = torch.empty(sum(recv_sizes), dtype=torch.int64, device=device)
        dist.all_to_all_single(requests, keys, recv_sizes, send_sizes, group=self._pg)
        requests -= self._rank * total  # every request received is for this rank's rows
        base = torch.tensor(bases, device=device)
        table = torch.searchsorted(base[1:], requests, right=True)
        rows = torch.zeros((requests.numel(), max(widths, default=0)), dtype=wire, device=device)
        for k, name in enumerate(tables):
            where = (table == k).nonzero().squeeze(1)
            first = bases[k] + self.local_rows(name)[0]
            codes: torch.Tensor = getattr(self, name)
            rows[where, : widths[k]] = codes.index_select(0, requests[where] - first).to(wire)
        answers = torch.empty((len(keys), rows.shape[1]), dtype=wire, device=device)
        dist.all_to_all_single(answers, rows, send_sizes, recv_sizes, group=self._pg)
        per_id = answers.index_select(0, inverse)
        counts = [part.numel() for part in ids]
        return [
            part[:, :width].to(p.dtype)
            for part, width, p in zip(per_id.split(counts), widths, placements)
        ]


def _to_sharded_tensors(module: ShardedCodes, state: dict[str, Any], prefix: str, _: Any) -> None:
    for name in module.sharded_tables:
        state[prefix + name] = module.sharded_tensor(name)


class RemoteCodeSource:
    """The ``code_source`` of ``MECEmbeddingBagCollection.remap`` for sharded code tables.

    Splits the checked ids (outer feature order) by table, fetches the sharded tables' codes rows
    from their owners in one exchange, and hands ``remap`` those rows (indexed by position) plus
    the replicated tables' whole codes (indexed by id).
    """

    def __init__(self, module: nn.Module, codes: ShardedCodes) -> None:
        compressed = set(module.compression)
        self._codes = codes
        self._table_features = [len(c.feature_names) or 1 for c in module.embedding_bag_configs()]
        names = [c.name for c in module.embedding_bag_configs()]
        self._compressed = [(t, name) for t, name in enumerate(names) if name in compressed]
        sharded = set(codes.sharded_tables)
        self._sharded = [(t, name) for t, name in self._compressed if name in sharded]

    def __call__(
        self, ids: torch.Tensor, ids_per_feature: list[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        counts, first = [], 0
        for num in self._table_features:
            counts.append(sum(ids_per_feature[first : first + num]))
            first += num
        segments = list(ids.split(counts))
        fetched = dict(
            zip(
                (t for t, _ in self._sharded),
                self._codes.fetch(
                    [segments[t] for t, _ in self._sharded], [n for _, n in self._sharded]
                ),
            )
        )
        codes = []
        for t, name in self._compressed:
            if t in fetched:
                codes.append(fetched[t])
                segments[t] = torch.arange(counts[t], device=ids.device)
            else:
                codes.append(getattr(self._codes, name))
        return torch.cat(segments), codes
