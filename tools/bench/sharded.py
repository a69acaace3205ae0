"""Sharded training throughput and embedding bytes per rank: plain EBC vs MEC, same run.

Three models: plain, MEC with replicated codes (`mec`), and MEC with every compressed table's
codes sharded row-wise over the ranks (`mec_sharded_codes`: ids travel to the rank owning their
rows, which remaps them; see mec_torchrec/distributed/codes.py).

Criteo Kaggle-shaped tables (the 26 cardinalities of MEC.md times --scale, dim --dim). The plain
EmbeddingBagCollection is planned by TorchRec's stock planner with TorchRec's default sharders;
the MEC collection (tables of >= --min-rows rows at full scale compressed with L subspaces and
K-entry codebooks, the rest full; uniform random codes loaded after DMP) by `make_planner` with
`get_default_sharders()` (codes placed by --codes for `mec_sharded_codes`). All start on the meta
device. All train the
same model (embeddings -> linear head -> BCE) on the same random one-hot batches with FBGEMM's
fused row-wise Adagrad for sharded tables and torch Adagrad for everything else.

Run (2 gloo ranks on CPU; the allocator settings stop glibc from returning every freed
activation over 32 MiB to the OS and page-faulting it back in each step, see docs/benchmarks.md):

    export MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000
    .venv/bin/torchrun --nproc_per_node 2 tools/bench/sharded.py --scale 0.25

All models are built first, then timed in alternating rounds of --steps steps; each keeps its
best round (the host may be shared). Rank 0 prints one row per model, the MEC / plain ratios and
the sharded / replicated codes ratios; --json writes them too.
"""

import argparse
import json
import logging
import os
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.sharding_plan import get_default_sharders as torchrec_default_sharders
from torchrec.distributed.types import ModuleSharder, ShardingEnv
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from mec_torchrec.distributed import (
    MECEmbeddingBagCollectionSharder,
    load_mec_state,
    make_planner,
)
from mec_torchrec.modules import MECEmbeddingBagCollection, MECTableConfig
from mec_torchrec.quantize import CompressedTable

CRITEO_KAGGLE = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593,
                 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
FUSED = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01}


class Model(nn.Module):
    """Embeddings -> linear head -> BCE loss."""

    def __init__(self, sparse: nn.Module, width: int) -> None:
        super().__init__()
        self.sparse = sparse
        self.head = nn.Linear(width, 1, device=torch.device("meta"))

    def forward(self, features: KeyedJaggedTensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.sparse(features).values()).squeeze(-1)
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def tables(scale: float, dim: int) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            name=f"t_C{i}",
            num_embeddings=max(1, round(n * scale)),
            embedding_dim=dim,
            feature_names=[f"C{i}"],
        )
        for i, n in enumerate(CRITEO_KAGGLE, start=1)
    ]


def build(kind: str, args: argparse.Namespace) -> tuple[Model, list[ModuleSharder[nn.Module]], EmbeddingShardingPlanner]:
    """The unsharded model (meta weights where possible), its sharders and its planner."""
    configs = tables(args.scale, args.dim)
    topology = Topology(world_size=dist.get_world_size(), compute_device="cpu")
    ebc_sharder = EmbeddingBagCollectionSharder(fused_params=dict(FUSED))
    if kind == "plain":
        sparse: nn.Module = EmbeddingBagCollection(configs, device=torch.device("meta"))
        sharders = [ebc_sharder if isinstance(s, EmbeddingBagCollectionSharder) else s
                    for s in torchrec_default_sharders()]
        planner = EmbeddingShardingPlanner(topology=topology, batch_size=args.batch_size, debug=False)
    else:
        compression = {
            t.name: MECTableConfig(args.subspaces, args.codebook_size)
            for t, full_rows in zip(configs, CRITEO_KAGGLE)
            if full_rows >= args.min_rows
        }
        sparse = MECEmbeddingBagCollection(configs, compression, device=torch.device("meta"))
        sharders = [*torchrec_default_sharders(), MECEmbeddingBagCollectionSharder(ebc_sharder)]
        codes = "data_parallel" if kind == "mec" else args.codes
        planner = make_planner(
            topology, args.batch_size, codes_sharding=dict.fromkeys(compression, codes)
        )
    return Model(sparse, args.dim * len(configs)), sharders, planner


def random_compressed_tables(mec: MECEmbeddingBagCollection) -> dict[str, CompressedTable]:
    """Uniform random codes and small random codebooks, identical on every rank (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for config in mec.embedding_bag_configs():
        mec_config = mec.compression.get(config.name)
        if mec_config is None:
            continue
        L, K = mec_config.num_subspaces, mec_config.codebook_size
        codes = torch.randint(0, K, (config.num_embeddings, L), generator=g, dtype=torch.uint8)
        codebooks = torch.randn(L, K, config.embedding_dim // L, generator=g) * 0.01
        out[config.name] = CompressedTable(codes, codebooks)
    return out


def batches(args: argparse.Namespace, count: int) -> list[tuple[KeyedJaggedTensor, torch.Tensor]]:
    """Random one-hot batches (one uniform id per feature and sample), different per rank."""
    g = torch.Generator().manual_seed(1000 + dist.get_rank())
    configs = tables(args.scale, args.dim)
    out = []
    for _ in range(count):
        values = torch.cat([torch.randint(0, t.num_embeddings, (args.batch_size,), generator=g)
                            for t in configs])
        kjt = KeyedJaggedTensor(
            keys=[t.feature_names[0] for t in configs],
            values=values,
            lengths=torch.ones(len(configs) * args.batch_size, dtype=torch.int64),
        )
        out.append((kjt, torch.randint(0, 2, (args.batch_size,), generator=g).float()))
    return out


def local_bytes(state: dict[str, torch.Tensor], prefix: str) -> int:
    """Bytes this rank holds for state entries under `prefix` (local shards or whole tensors)."""
    total = 0
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        tensors = [s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


class Trainer:
    """One DMP-wrapped model with its optimizer and batches; `time(steps)` returns seconds."""

    def __init__(self, kind: str, args: argparse.Namespace) -> None:
        model, sharders, planner = build(kind, args)
        pg = dist.group.WORLD
        plan = planner.collective_plan(model, sharders, pg)
        self.kind = kind
        mec = model.sparse if isinstance(model.sparse, MECEmbeddingBagCollection) else None
        compressed = random_compressed_tables(mec) if mec is not None else {}
        self.sharding_types = dict(
            Counter(ps.sharding_type for name, ps in plan.plan["sparse"].items()
                    if not name.startswith("codes."))
        )
        self.codes_types = dict(
            Counter(ps.sharding_type for name, ps in plan.plan["sparse"].items()
                    if name.startswith("codes."))
        )
        self.dmp = DistributedModelParallel(
            model, env=ShardingEnv.from_process_group(pg), device=torch.device("cpu"),
            plan=plan, sharders=sharders,
        )
        dense = KeyedOptimizerWrapper(
            dict(in_backward_optimizer_filter(self.dmp.named_parameters())),
            lambda params: torch.optim.Adagrad(params, lr=0.01),
        )
        self.optimizer = CombinedOptimizer([self.dmp.fused_optimizer, dense])
        if compressed:  # DMP zero-filled the meta codes: every id would hit code 0
            load_mec_state(self.dmp, compressed)
        self.data = batches(args, 8)
        self.step_count = 0

    def time(self, steps: int) -> float:
        """Wall seconds of `steps` training steps on the slowest rank."""
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            features, labels = self.data[self.step_count % len(self.data)]
            self.step_count += 1
            loss = self.dmp(features, labels)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed)

    def remap_seconds(self, repeats: int = 10) -> float | None:
        """Seconds of the MEC module's remap (ids -> code ids) per batch, slowest rank, best of
        3 rounds; None for a module without one."""
        sparse = self.dmp.module.sparse
        if not hasattr(sparse, "remap"):
            return None
        best = float("inf")
        for _ in range(3):
            dist.barrier()
            start = time.perf_counter()
            for i in range(repeats):
                sparse.remap(self.data[i % len(self.data)][0])
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            best = min(best, float(elapsed) / repeats)
        return best

    def fused_remap_free(self) -> list[str]:
        """Compressed tables the training step pools from raw ids (the fused data-parallel path,
        mec_torchrec/distributed/data_parallel.py): their step never calls ``remap``."""
        fused = getattr(self.dmp.module.sparse, "fused_tables", None)
        return [] if fused is None else list(fused._fused.compressed)

    def bytes_per_rank(self, prefix: str = "sparse.") -> list[int]:
        mine = torch.tensor([float(local_bytes(self.dmp.state_dict(), prefix))])
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        return [int(b) for b in every]


def measure(args: argparse.Namespace) -> list[dict[str, object]]:
    """Builds both models, then times them in alternating rounds; keeps each one's best round.

    Alternating rounds on the same warm process share whatever else loads the host, so the ratio
    of the best rounds is fairer than two back-to-back runs.
    """
    trainers = [Trainer(kind, args) for kind in ("plain", "mec", "mec_sharded_codes")]
    for trainer in trainers:
        trainer.time(args.warmup)
    best = {t.kind: float("inf") for t in trainers}
    for _ in range(args.rounds):
        for trainer in trainers:
            best[trainer.kind] = min(best[trainer.kind], trainer.time(args.steps))
    global_batch = args.batch_size * dist.get_world_size()
    return [
        {
            "model": t.kind,
            "samples_per_s": global_batch * args.steps / best[t.kind],
            "embedding_bytes_per_rank": t.bytes_per_rank(),
            "codes_bytes_per_rank": t.bytes_per_rank("sparse.codes."),
            "remap_ms": None if (r := t.remap_seconds()) is None else r * 1e3,
            "tables_without_remap": t.fused_remap_free(),
            "sharding_types": t.sharding_types,
            "codes_sharding_types": t.codes_types,
        }
        for t in trainers
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.25, help="times the Criteo cardinalities")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--subspaces", type=int, default=4, help="L")
    parser.add_argument("--codebook-size", type=int, default=256, help="K")
    parser.add_argument("--min-rows", type=int, default=100_000,
                        help="compress tables with at least this many rows at full scale")
    parser.add_argument("--batch-size", type=int, default=4096, help="per rank")
    parser.add_argument("--steps", type=int, default=10, help="per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; best kept")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--codes", choices=["row_wise", "table_wise"], default="row_wise",
                        help="placement of every compressed table's codes in mec_sharded_codes")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    dist.init_process_group("gloo")
    rows = measure(args)
    if dist.get_rank() == 0:
        plain, mec, sharded = rows
        for row in rows:
            mib = [round(b / 2**20, 1) for b in row["embedding_bytes_per_rank"]]
            codes_mib = [round(b / 2**20, 1) for b in row["codes_bytes_per_rank"]]
            remap = "" if row["remap_ms"] is None else f"  remap {row['remap_ms']:.2f} ms/batch"
            if row["remap_ms"] is not None and row["tables_without_remap"]:
                # remap() still covers every table; the step skips it for these.
                remap += f" (not on the step for {len(row['tables_without_remap'])} fused tables)"
            print(f"{row['model']:>17}: {row['samples_per_s']:10.0f} samples/s{remap}  "
                  f"embedding MiB per rank {mib} (codes {codes_mib})  "
                  f"plan {row['sharding_types']} codes {row['codes_sharding_types']}")
        speed = mec["samples_per_s"] / plain["samples_per_s"]
        memory = max(plain["embedding_bytes_per_rank"]) / max(mec["embedding_bytes_per_rank"])
        print(f"MEC / plain: {speed:.2f}x samples/s, {memory:.1f}x less embedding memory on the "
              f"fullest rank (world {dist.get_world_size()}, threads/rank "
              f"{torch.get_num_threads()}, {vars(args)})")
        codes_speed = sharded["samples_per_s"] / mec["samples_per_s"]
        codes_memory = max(mec["embedding_bytes_per_rank"]) / max(
            sharded["embedding_bytes_per_rank"])
        print(f"sharded / replicated codes: {codes_speed:.2f}x samples/s, {codes_memory:.2f}x "
              f"less embedding memory on the fullest rank")
        if args.json:
            args.json.write_text(json.dumps(
                {"rows": rows, "speed_ratio": speed, "memory_ratio": memory,
                 "codes_speed_ratio": codes_speed, "codes_memory_ratio": codes_memory,
                 "args": {k: str(v) for k, v in vars(args).items()},
                 "world_size": dist.get_world_size(), "host_cpus": os.cpu_count()}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
