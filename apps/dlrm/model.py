"""Model building for the DLRM app: tables, DLRM / DLRM_DCN, optimizers, sharding.

The model is TorchRec's own: ``DLRMTrain(DLRM(...))`` returns ``(loss, (loss, logits, labels))``,
the shape ``TrainPipelineSparseDist`` expects. Embedding tables train with FBGEMM's fused
optimizers (registered per parameter with ``apply_optimizer_in_backward`` before sharding, so
codebooks and full tables can get different learning rates); dense layers train with a torch
optimizer wrapped into the same ``CombinedOptimizer``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from apps.dlrm.spec import ModelSpec, TrainingSpec
from mec_torchrec.quantize import FisherCollector


@dataclass(frozen=True)
class Env:
    """Where this process runs: rank, world size, device and the default process group."""

    rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def table_configs(
    feature_names: list[str], num_embeddings: dict[str, int], dim: int
) -> list[EmbeddingBagConfig]:
    """One table per categorical feature, named ``t_{feature}`` (the data layer's convention)."""
    return [
        EmbeddingBagConfig(
            name=f"t_{f}", embedding_dim=dim, num_embeddings=num_embeddings[f], feature_names=[f]
        )
        for f in feature_names
    ]


def build_dlrm(ebc: nn.Module, spec: ModelSpec, num_dense: int) -> DLRMTrain:
    """DLRM or DLRM_DCN around any EBC-like module (a plain EBC or a MEC collection)."""
    if spec.arch == "dlrm":
        dlrm = DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=num_dense,
            dense_arch_layer_sizes=spec.dense_arch_layer_sizes,
            over_arch_layer_sizes=spec.over_arch_layer_sizes,
        )
    else:
        dlrm = DLRM_DCN(
            embedding_bag_collection=ebc,
            dense_in_features=num_dense,
            dense_arch_layer_sizes=spec.dense_arch_layer_sizes,
            over_arch_layer_sizes=spec.over_arch_layer_sizes,
            dcn_num_layers=spec.dcn_num_layers,
            dcn_low_rank_dim=spec.dcn_low_rank_dim,
        )
    return DLRMTrain(dlrm)


def full_ebc(tables: list[EmbeddingBagConfig]) -> EmbeddingBagCollection:
    # On the meta device: DMP allocates and initialises each shard on its own rank.
    return EmbeddingBagCollection(tables=tables, device=torch.device("meta"))


def register_embedding_optimizer(
    params: Iterable[nn.Parameter], spec: TrainingSpec, lr: float
) -> None:
    """Attach a fused FBGEMM optimizer to embedding parameters (read by the sharders)."""
    cls = {
        "rowwise_adagrad": RowWiseAdagrad,
        "adagrad": torch.optim.Adagrad,
        "sgd": torch.optim.SGD,
    }[spec.embedding_optimizer]
    kwargs: dict = {"lr": lr}
    if spec.embedding_optimizer == "rowwise_adagrad":
        kwargs["eps"] = 1e-8
    apply_optimizer_in_backward(cls, list(params), kwargs)


def plan_and_shard(
    model: nn.Module,
    env: Env,
    sharders: list[ModuleSharder],
    planner: EmbeddingShardingPlanner | None,
    batch_size: int,
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plan with the given planner (TorchRec's by default) and wrap in DistributedModelParallel."""
    if planner is None:
        topology = Topology(
            world_size=env.world_size,
            compute_device=env.device.type,
            local_world_size=env.local_world_size,
        )
        planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=env.device, plan=plan, sharders=sharders)
    return dmp, plan


def make_optimizer(
    dmp: DistributedModelParallel, spec: TrainingSpec, dense_lr: float
) -> CombinedOptimizer:
    """The fused embedding optimizers of DMP + a torch optimizer for every other parameter."""
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    wd = spec.dense_weight_decay
    factory = {
        "adam": lambda p: torch.optim.Adam(p, lr=dense_lr, weight_decay=wd),
        "adagrad": lambda p: torch.optim.Adagrad(p, lr=dense_lr, weight_decay=wd),
        "sgd": lambda p: torch.optim.SGD(p, lr=dense_lr, weight_decay=wd),
    }[spec.dense_optimizer]
    return CombinedOptimizer([dmp.fused_optimizer, KeyedOptimizerWrapper(dense, factory)])


def describe_plan(plan: ShardingPlan) -> list[str]:
    """One line per table: how the plan placed it (logged by rank 0)."""
    lines = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            ranks = sorted(set(ps.ranks or []))
            lines.append(
                f"{module_path or '.'}:{table} {ps.sharding_type}/{ps.compute_kernel} ranks={ranks}"
            )
    return lines


def collect_fisher(
    model: nn.Module, batches: Iterable[Batch], num_batches: int, device: torch.device
) -> FisherCollector:
    """The loss Fisher of a ``DLRMTrain`` (plain or under DMP) w.r.t. every feature's pooled
    embedding, over the first ``num_batches`` of ``batches``, in eval mode (nothing trains; the
    caller all-reduces it when distributed)."""
    dlrm = model.module.model if isinstance(model, DistributedModelParallel) else model.model
    collector = FisherCollector(dlrm.sparse_arch, dlrm.sparse_arch.sparse_feature_names)
    was_training = model.training
    model.eval()
    with collector:
        for batch in itertools.islice(batches, num_batches):
            batch = batch.to(device)
            loss, _ = model(batch)  # the batch's mean loss: times B, each sample's own gradient
            collector.accumulate(loss * batch.labels.numel())
    model.train(was_training)
    return collector
