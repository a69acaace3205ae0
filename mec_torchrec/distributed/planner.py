"""Planning MEC modules: place the codes, reserve them, then let the stock planner do the rest.

TorchRec 1.8's planner sizes each sharding option from the tensors `shardable_parameters()`
returns and never calls `ModuleSharder.storage_usage()`. For a MEC module those tensors are the
codebook tables (and the full, uncompressed tables), which the stock storage estimator already
sizes correctly. What it cannot see are the `codes` buffers: non-trainable, placed before planning
(replicated on every rank, or sharded row-wise / table-wise when the replicas would not fit; see
`place_codes`), and skipped by the stock reservations (which treat the whole MEC module as
"sharded"). A per-rank fixed cost is what a `StorageReservation` models, so that is where the
codes each rank holds are counted; a `ShardEstimator` attaches bytes to the codebook shards the
planner places, which is not where the codes go.
"""

import copy
import logging

from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    PlannerError,
    PlannerErrorType,
    Storage,
    StorageReservation,
    Topology,
)
from torchrec.distributed.types import (
    ModuleSharder,
    ParameterSharding,
    ShardingPlan,
    ShardingType,
)

from mec_torchrec.distributed.codes import (
    CODES_PREFIX,
    CODES_SHARDING_TYPES,
    codes_key,
    codes_sharding,
    describe,
    split_plan,
)
from mec_torchrec.modules import MECEmbeddingBagCollection

logger: logging.Logger = logging.getLogger(__name__)
#: Codes stay replicated while all replicated codes take at most this share of a rank's memory.
REPLICATED_CODES_SHARE = 0.25


def mec_modules(module: nn.Module) -> list[MECEmbeddingBagCollection]:
    """Every distinct `MECEmbeddingBagCollection` inside `module` (itself included)."""
    seen: dict[int, MECEmbeddingBagCollection] = {}
    for m in module.modules():
        if type(m) is MECEmbeddingBagCollection:
            seen.setdefault(id(m), m)
    return list(seen.values())


def named_mec_modules(module: nn.Module) -> dict[str, MECEmbeddingBagCollection]:
    """fqn -> `MECEmbeddingBagCollection` inside `module` (first name of each distinct one)."""
    out: dict[str, MECEmbeddingBagCollection] = {}
    seen: set[int] = set()
    for name, m in module.named_modules():
        if type(m) is MECEmbeddingBagCollection and id(m) not in seen:
            seen.add(id(m))
            out[name] = m
    return out


#: (MEC module fqn, table name) -> the plan entry placing that table's codes.
CodesPlacement = dict[tuple[str, str], ParameterSharding]


def _preferred(allowed: list[str], shard: bool) -> str:
    order = [ShardingType.ROW_WISE.value, ShardingType.TABLE_WISE.value]
    order = (
        [*order, ShardingType.DATA_PARALLEL.value]
        if shard
        else [ShardingType.DATA_PARALLEL.value, *order]
    )
    return next(kind for kind in order if kind in allowed)


def place_codes(
    module: nn.Module,
    topology: Topology,
    overrides: dict[str, str | list[str]] | None = None,
    replicated_share: float = REPLICATED_CODES_SHARE,
) -> CodesPlacement:
    """Where each compressed table's codes go: replicated if they fit comfortably, else sharded.

    Codes stay replicated (`data_parallel`) while all replicated codes take at most
    `replicated_share` of the smallest rank's memory (HBM on CUDA, DDR on CPU); otherwise the
    largest tables are sharded (`row_wise` over every rank) until the rest fit. `overrides`
    (table name -> `data_parallel` | `row_wise` | `table_wise`, or a list of those to choose
    from, preferring row_wise to table_wise) win; a `table_wise` table goes to the rank holding
    the fewest code bytes so far.

    Raises:
        ValueError: an override names an unknown table or sharding type.
    """
    allowed = {
        name: [kinds] if isinstance(kinds, str) else list(kinds)
        for name, kinds in (overrides or {}).items()
    }
    world = topology.world_size
    on_hbm = topology.compute_device in {"cuda", "mtia"}
    budget = min(d.storage.hbm if on_hbm else d.storage.ddr for d in topology.devices)
    tables = [
        (fqn, name, buffer)
        for fqn, mec in named_mec_modules(module).items()
        for name, buffer in mec.codes.named_buffers()
    ]
    unknown = sorted(set(allowed) - {name for _, name, _ in tables})
    if unknown:
        raise ValueError(f"codes overrides name {unknown}, which are not compressed tables")
    bad = {n: t for n, t in allowed.items() if not t or set(t) - set(CODES_SHARDING_TYPES)}
    if bad:
        raise ValueError(f"codes overrides {bad}: expected one of {CODES_SHARDING_TYPES}")
    choices = {
        (fqn, name): allowed.get(name, list(CODES_SHARDING_TYPES)) for fqn, name, _ in tables
    }
    kinds = {key: options[0] for key, options in choices.items() if len(options) == 1}
    replicated = sum(
        b.numel() * b.element_size()
        for fqn, name, b in tables
        if kinds.get((fqn, name), ShardingType.DATA_PARALLEL.value)
        == ShardingType.DATA_PARALLEL.value
    )
    for fqn, name, buffer in sorted(tables, key=lambda t: -t[2].numel() * t[2].element_size()):
        if (fqn, name) in kinds:
            continue
        shard = replicated > replicated_share * budget and world > 1
        kinds[fqn, name] = _preferred(choices[fqn, name], shard)
        if kinds[fqn, name] != ShardingType.DATA_PARALLEL.value:
            replicated -= buffer.numel() * buffer.element_size()
    load = [0] * world
    placement: CodesPlacement = {}
    for fqn, name, buffer in tables:
        kind = kinds[fqn, name]
        ranks = list(range(world))
        if kind == ShardingType.TABLE_WISE.value:
            ranks = [min(range(world), key=lambda r: load[r])]
        sharding = codes_sharding(*buffer.shape, kind, ranks, topology.compute_device)
        for rank, rows in _rows_per_rank(sharding, buffer.shape[0], world).items():
            load[rank] += rows * buffer.shape[1] * buffer.element_size()
        placement[fqn, name] = sharding
    return placement


def _rows_per_rank(sharding: ParameterSharding, num_rows: int, world: int) -> dict[int, int]:
    if sharding.sharding_type == ShardingType.DATA_PARALLEL.value:
        return dict.fromkeys(range(world), num_rows)
    shards = sharding.sharding_spec.shards  # type: ignore[union-attr]
    return {int(s.placement.rank()): int(s.shard_sizes[0]) for s in shards}


def codes_bytes_per_rank(
    module: nn.Module, world_size: int, placement: CodesPlacement | None = None
) -> list[int]:
    """Bytes of MEC codes each rank holds under `placement` (every table replicated if None)."""
    out = [0] * world_size
    for fqn, mec in named_mec_modules(module).items():
        for name, buffer in mec.codes.named_buffers():
            sharding = (placement or {}).get((fqn, name))
            rows = (
                dict.fromkeys(range(world_size), buffer.shape[0])
                if sharding is None
                else _rows_per_rank(sharding, buffer.shape[0], world_size)
            )
            for rank, count in rows.items():
                out[rank] += count * buffer.shape[1] * buffer.element_size()
    return out


def describe_codes(plan: ShardingPlan) -> list[str]:
    """One line per MEC table whose codes the plan places: `"sparse.t_C3 codes: replicated"`,
    `"... codes: row_wise over 8 ranks"` or `"... codes: table_wise on rank 3"`."""
    lines = []
    for path, module_plan in plan.plan.items():
        _, codes = split_plan(dict(module_plan))  # type: ignore[arg-type]
        lines += [describe(f"{path}.{name}" if path else name, ps) for name, ps in codes.items()]
    return lines


def replicated_bytes(module: nn.Module) -> int:
    """Bytes of MEC codes inside `module`: what every rank holds if no code table is sharded.

    Works on meta-device modules (sizes come from shapes and dtypes), so a plan can be checked
    without allocating the codes.
    """
    return sum(
        b.numel() * b.element_size() for mec in mec_modules(module) for b in mec.codes.buffers()
    )


class MECStorageReservation(HeuristicalStorageReservation):
    """TorchRec's heuristic reservation (dense parameters, KJT buffers, margin) plus the codes.

    The MEC codes each rank holds (all of a replicated table, a sharded table's local rows; every
    table replicated unless `placement` is set, as `MECShardingPlanner` does) are subtracted from
    that rank's HBM (CUDA) or DDR (CPU) and reported as part of the dense reservation in the
    planner's stats. Subclassing the stock reservation keeps the planner's error messages and
    stats working (they read its fields).

    Args:
        percentage: extra margin of HBM to keep free, as for the stock reservation.
        parameter_multiplier: heuristic multiplier for dense parameter bytes (stock default 6).
        dense_tensor_estimate: bytes of dense tensors per rank, overriding the heuristic.

    Raises:
        PlannerError (INSUFFICIENT_STORAGE) from `reserve` when the codes do not fit on a rank,
        naming the bytes needed and left.
    """

    def __init__(
        self,
        percentage: float = 0.15,
        parameter_multiplier: float = 6.0,
        dense_tensor_estimate: int | None = None,
    ) -> None:
        super().__init__(percentage, parameter_multiplier, dense_tensor_estimate)
        #: Where the codes go (see `place_codes`); None: every table replicated.
        self.placement: CodesPlacement | None = None
        #: Code bytes of the fullest rank, after `reserve`.
        self.codes_bytes: int = 0

    def reserve(
        self,
        topology: Topology,
        batch_size: int,
        module: nn.Module,
        sharders: list[ModuleSharder[nn.Module]],
        constraints: dict[str, ParameterConstraints] | None = None,
    ) -> Topology:
        reserved = super().reserve(topology, batch_size, module, sharders, constraints)
        per_rank = codes_bytes_per_rank(module, len(reserved.devices), self.placement)
        self.codes_bytes = max(per_rank, default=0)
        on_hbm = topology.compute_device in {"cuda", "mtia"}
        for rank, (device, needed) in enumerate(zip(reserved.devices, per_rank)):
            free = device.storage.hbm if on_hbm else device.storage.ddr
            if free < needed:
                raise PlannerError(
                    error_type=PlannerErrorType.INSUFFICIENT_STORAGE,
                    message=(
                        f"MEC codes need {needed} bytes on rank {rank}, which has {free} bytes "
                        f"of {'HBM' if on_hbm else 'DDR'} left after the dense and KJT "
                        "reservations (shard the codes: make_planner(codes_sharding=...))"
                    ),
                )
            device.storage -= Storage(
                hbm=needed if on_hbm else 0, ddr=0 if on_hbm else needed, ssd=0
            )
        if self._dense_storage is not None:
            fullest = self.codes_bytes
            self._dense_storage += Storage(
                hbm=fullest if on_hbm else 0, ddr=0 if on_hbm else fullest, ssd=0
            )
        self._last_reserved_topology = copy.deepcopy(reserved)
        return reserved


def codebook_tables(module: nn.Module) -> list[str]:
    """Inner table names of every MEC module's codebooks (not its full, uncompressed tables)."""
    names = []
    for mec in mec_modules(module):
        full = {t.name for t in mec.embedding_bag_configs()}
        names += [t.name for t in mec.codebooks.embedding_bag_configs() if t.name not in full]
    return names


def in_backward_tables(module: nn.Module) -> list[str]:
    """Inner tables of MEC modules whose weight has an optimizer applied in backward.

    TorchRec turns such settings into the fused kernel's optimizer, but a data_parallel table uses
    the dense kernel and silently hands its weight to the dense optimizer instead.
    """
    names = []
    for mec in mec_modules(module):
        for name, bag in mec.codebooks.embedding_bags.items():
            if getattr(bag.weight, "_optimizer_classes", None):
                names.append(name)
    return names


_MODEL_PARALLEL = [
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.ROW_WISE.value,
]


class MECShardingPlanner(EmbeddingShardingPlanner):
    """`EmbeddingShardingPlanner` that plans MEC codebooks `codebook_sharding_types` by default.

    Codebooks are tiny (K x D/L), so replicating them (data_parallel) removes the all-to-alls of
    compressed features; left free, TorchRec's planner sometimes shards them table-wise. Tables
    whose weight has an optimizer applied in backward (`apply_optimizer_in_backward`) are kept off
    data_parallel instead, where TorchRec would drop that optimizer. Tables the caller constrains
    keep the caller's constraints.

    Before planning it places each compressed table's codes (`place_codes`: replicated while they
    fit comfortably, else sharded; `codes_sharding` overrides), has the reservation count what
    each rank holds, and adds the placement to the plan as `codes.<table>` entries (one per table,
    shown by the plan's printout and logged as `describe_codes` lines). Build it with
    `make_planner`.
    """

    def __init__(
        self,
        *,
        codebook_sharding_types: list[str] | None,
        constraints: dict[str, ParameterConstraints] | None = None,
        codes_sharding: dict[str, str | list[str]] | None = None,
        replicated_codes_share: float = REPLICATED_CODES_SHARE,
        **kwargs: object,
    ) -> None:
        # Constraints on `codes.<table>` (sharding_types) are codes overrides, not tables the
        # stock planner knows; an explicit `codes_sharding` entry wins over them.
        self._codes_sharding: dict[str, str | list[str]] = {
            key[len(CODES_PREFIX) :]: list(c.sharding_types or CODES_SHARDING_TYPES)
            for key, c in (constraints or {}).items()
            if key.startswith(CODES_PREFIX)
        }
        self._codes_sharding.update(codes_sharding or {})
        self._requested = {
            k: c for k, c in (constraints or {}).items() if not k.startswith(CODES_PREFIX)
        }
        # The enumerator, estimators and reservation all keep a reference to this dict, so
        # per-module defaults added in plan() reach every one of them.
        self._planned_constraints: dict[str, ParameterConstraints] = dict(self._requested)
        super().__init__(constraints=self._planned_constraints, **kwargs)  # type: ignore[arg-type]
        self._codebook_sharding_types = codebook_sharding_types
        self._replicated_codes_share = replicated_codes_share

    def plan(self, module: nn.Module, sharders: list[ModuleSharder[nn.Module]]) -> ShardingPlan:
        self._planned_constraints.clear()
        self._planned_constraints.update(self._requested)
        fused_only = set(in_backward_tables(module))
        for name in fused_only:
            self._planned_constraints.setdefault(
                name, ParameterConstraints(sharding_types=list(_MODEL_PARALLEL))
            )
        if self._codebook_sharding_types:
            for name in codebook_tables(module):
                self._planned_constraints.setdefault(
                    name, ParameterConstraints(sharding_types=list(self._codebook_sharding_types))
                )
        placement = place_codes(
            module, self._topology, self._codes_sharding, self._replicated_codes_share
        )
        if isinstance(self._storage_reservation, MECStorageReservation):
            self._storage_reservation.placement = placement
        plan = super().plan(module, sharders)
        for (fqn, table), sharding in placement.items():
            plan.plan[fqn][codes_key(table)] = sharding  # type: ignore[index]
        lines = describe_codes(plan)
        for line in lines:
            logger.info(line)
        if self._debug and lines:
            print("\n".join(lines))
        return plan


def make_planner(
    topology: Topology,
    batch_size: int,
    *,
    constraints: dict[str, ParameterConstraints] | None = None,
    codebook_sharding_types: list[str] | None = None,
    codes_sharding: dict[str, str] | None = None,
    replicated_codes_share: float = REPLICATED_CODES_SHARE,
    reservation: StorageReservation | None = None,
    debug: bool = False,
) -> EmbeddingShardingPlanner:
    """A planner that places the MEC codes and whose storage reservation counts them.

    Use it with `get_default_sharders()`. Plans are keyed by the MEC module's fqn and its inner
    table names (`t@0`, ..., full tables by name), so `constraints` use those names too.

    Args:
        topology: devices and their memory (the per-rank budget).
        batch_size: per-rank batch size (sizes the KJT reservation).
        constraints: per inner table constraints, as for the stock planner; they win over the
            codebook default.
        codebook_sharding_types: sharding types allowed for codebook tables not in `constraints`;
            `["data_parallel"]` if None, `[]` to let the planner choose freely.
        codes_sharding: table name -> `data_parallel` (replicated) | `row_wise` | `table_wise`
            for its codes, or a list of those to choose from by the memory budget (as other
            tables are, see `place_codes`). `constraints` may say the same as
            `{"codes.<table>": ParameterConstraints(sharding_types=[...])}`.
        replicated_codes_share: the share of a rank's memory replicated codes may take before
            the largest tables are sharded.
        reservation: a `MECStorageReservation` with non-default settings; the default otherwise.
        debug: print the planner's stats table.

    Example::

        planner = make_planner(Topology(world_size=2, compute_device="cpu"), batch_size=4096)
        plan = planner.collective_plan(model, get_default_sharders(), pg)
    """
    return MECShardingPlanner(
        codebook_sharding_types=(
            [ShardingType.DATA_PARALLEL.value]
            if codebook_sharding_types is None
            else codebook_sharding_types
        ),
        topology=topology,
        batch_size=batch_size,
        constraints=constraints,
        codes_sharding=codes_sharding,
        replicated_codes_share=replicated_codes_share,
        storage_reservation=reservation or MECStorageReservation(),
        debug=debug,
    )
