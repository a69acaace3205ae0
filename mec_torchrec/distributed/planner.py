"""Planning MEC modules: reserve the replicated codes, then let the stock planner do the rest.

TorchRec 1.8's planner sizes each sharding option from the tensors `shardable_parameters()`
returns and never calls `ModuleSharder.storage_usage()`. For a MEC module those tensors are the
codebook tables (and the full, uncompressed tables), which the stock storage estimator already
sizes correctly. What it cannot see are the `codes` buffers: non-trainable, replicated in full on
every rank whatever the plan, and skipped by the stock reservations (which treat the whole MEC
module as "sharded"). A per-rank fixed cost is what a `StorageReservation` models, so that is where
the codes are counted; a `ShardEstimator` attaches bytes to individual shards and would put them
on only the ranks holding a given shard.
"""

import copy

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
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType

from mec_torchrec.modules import MECEmbeddingBagCollection


def mec_modules(module: nn.Module) -> list[MECEmbeddingBagCollection]:
    """Every distinct `MECEmbeddingBagCollection` inside `module` (itself included)."""
    seen: dict[int, MECEmbeddingBagCollection] = {}
    for m in module.modules():
        if type(m) is MECEmbeddingBagCollection:
            seen.setdefault(id(m), m)
    return list(seen.values())


def replicated_bytes(module: nn.Module) -> int:
    """Bytes of MEC codes inside `module`: what every rank holds whatever the plan.

    Works on meta-device modules (sizes come from shapes and dtypes), so a plan can be checked
    without allocating the codes.
    """
    return sum(
        b.numel() * b.element_size() for mec in mec_modules(module) for b in mec.codes.buffers()
    )


class MECStorageReservation(HeuristicalStorageReservation):
    """TorchRec's heuristic reservation (dense parameters, KJT buffers, margin) plus the codes.

    The replicated MEC codes are subtracted from every rank's HBM (CUDA) or DDR (CPU) and reported
    as part of the per-rank dense reservation in the planner's stats. Subclassing the stock
    reservation keeps the planner's error messages and stats working (they read its fields).

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
        self.codes_bytes = replicated_bytes(module)
        on_hbm = topology.compute_device in {"cuda", "mtia"}
        codes = Storage(
            hbm=self.codes_bytes if on_hbm else 0,
            ddr=0 if on_hbm else self.codes_bytes,
            ssd=0,
        )
        for rank, device in enumerate(reserved.devices):
            free = device.storage.hbm if on_hbm else device.storage.ddr
            if free < self.codes_bytes:
                raise PlannerError(
                    error_type=PlannerErrorType.INSUFFICIENT_STORAGE,
                    message=(
                        f"MEC codes need {self.codes_bytes} bytes on every rank; rank {rank} has "
                        f"{free} bytes of {'HBM' if on_hbm else 'DDR'} left after the dense and "
                        "KJT reservations"
                    ),
                )
            device.storage -= codes
        if self._dense_storage is not None:
            self._dense_storage += codes
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
    keep the caller's constraints. Build it with `make_planner`.
    """

    def __init__(
        self,
        *,
        codebook_sharding_types: list[str] | None,
        constraints: dict[str, ParameterConstraints] | None = None,
        **kwargs: object,
    ) -> None:
        self._requested = dict(constraints or {})
        # The enumerator, estimators and reservation all keep a reference to this dict, so
        # per-module defaults added in plan() reach every one of them.
        self._planned_constraints: dict[str, ParameterConstraints] = dict(self._requested)
        super().__init__(constraints=self._planned_constraints, **kwargs)  # type: ignore[arg-type]
        self._codebook_sharding_types = codebook_sharding_types

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
        return super().plan(module, sharders)


def make_planner(
    topology: Topology,
    batch_size: int,
    *,
    constraints: dict[str, ParameterConstraints] | None = None,
    codebook_sharding_types: list[str] | None = None,
    reservation: StorageReservation | None = None,
    debug: bool = False,
) -> EmbeddingShardingPlanner:
    """A planner whose storage reservation counts the replicated MEC codes.

    Use it with `get_default_sharders()`. Plans are keyed by the MEC module's fqn and its inner
    table names (`t@0`, ..., full tables by name), so `constraints` use those names too.

    Args:
        topology: devices and their memory (the per-rank budget).
        batch_size: per-rank batch size (sizes the KJT reservation).
        constraints: per inner table constraints, as for the stock planner; they win over the
            codebook default.
        codebook_sharding_types: sharding types allowed for codebook tables not in `constraints`;
            `["data_parallel"]` if None, `[]` to let the planner choose freely.
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
        storage_reservation=reservation or MECStorageReservation(),
        debug=debug,
    )
