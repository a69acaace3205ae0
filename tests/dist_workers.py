"""Bodies that run on every rank of a spawned gloo group (see dist_harness.run_ranks).

Each body records named checks; the pytest side asserts one check per test.
"""

import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist_harness import CheckRecorder
from dist_models import (
    BATCH_SIZE,
    COMPRESSED,
    COMPRESSION,
    FEATURES,
    LR,
    TABLES,
    TinyModel,
    batch,
    compressed_tables,
    meta_model,
    plan,
    reference_mec,
    reference_model,
    sharders,
    spread_features,
    variant_mec,
    weighted,
    with_codes,
)
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, data_parallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import LazyAwaitable, ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import PoolingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from mec_torchrec.distributed import load_mec_state, make_planner
from mec_torchrec.distributed.codes import ShardedCodes, codes_sharding
from mec_torchrec.distributed.gather import gathered_state_dict
from mec_torchrec.export import export_model
from mec_torchrec.export.reader import read_manifest, read_table
from mec_torchrec.modules import MECEmbeddingBagCollection
from mec_torchrec.quantize import FisherCollector

SEED = 7
CPU = torch.device("cpu")
DIM_OF = {f: t.embedding_dim for t in TABLES for f in t.feature_names}


def wrap(kind: str, seed: int | None = None, kernel: str = "auto") -> DistributedModelParallel:
    """DMP over the meta model with a `kind` plan; filled from `reference_model(seed)` unless None."""
    dmp = DistributedModelParallel(
        meta_model(kernel),
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=CPU,
        plan=plan(kind, dist.get_world_size(), dist.group.WORLD),
        sharders=sharders(),
    )
    if seed is not None:
        load_mec_state(dmp, reference_model(seed).state_dict())
    return dmp


def pooled(dmp: DistributedModelParallel, seed: int) -> KeyedTensor:
    out = dmp.module.sparse(batch(seed).sparse_features)
    return out.wait() if isinstance(out, LazyAwaitable) else out


def local_values(value: torch.Tensor) -> torch.Tensor:
    """This rank's part of a state-dict entry: its local shards, or the whole replicated tensor."""
    if isinstance(value, ShardedTensor):
        shards = [s.tensor.detach().flatten() for s in value.local_shards()]
        return torch.cat(shards) if shards else torch.empty(0)
    return value.detach().flatten().clone()


def optimizer(dmp: DistributedModelParallel) -> CombinedOptimizer:
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.SGD(params, lr=LR),
    )
    return CombinedOptimizer([dmp.fused_optimizer, dense])


def check_forward(kind: str) -> None:
    dmp = wrap(kind, SEED)
    reference = reference_mec(SEED)
    for i in range(2):
        seed = 100 + 10 * dist.get_rank() + i
        got = pooled(dmp, seed).to_dict()
        want = reference(batch(seed).sparse_features).to_dict()
        assert sorted(got) == sorted(want), (list(got), list(want))
        for feature, tensor in want.items():
            torch.testing.assert_close(got[feature], tensor, rtol=1e-5, atol=1e-6)


def check_training(kind: str) -> None:
    dmp = wrap(kind, SEED)
    before = {k: local_values(v) for k, v in dmp.state_dict().items()}
    opt = optimizer(dmp)
    for step in range(3):
        loss, _ = dmp(batch(300 + 10 * dist.get_rank() + step))
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = dmp.state_dict()
    codebook_keys = [k for k in after if k.startswith("sparse.codebooks.")]
    assert codebook_keys, sorted(after)
    for key in codebook_keys:
        now = local_values(after[key])
        if now.numel() == 0:
            continue  # table lives on another rank
        assert not torch.equal(now, before[key]), f"{key} did not change in training"
        if not isinstance(after[key], ShardedTensor):  # data parallel: replicas must agree
            replicas = [torch.empty_like(now) for _ in range(dist.get_world_size())]
            dist.all_gather(replicas, now)
            for rank, replica in enumerate(replicas):
                assert torch.equal(replica, now), f"{key}: rank {rank} replica differs"
    for key in (k for k in after if k.startswith("sparse.codes.")):
        assert torch.equal(local_values(after[key]), before[key]), f"{key} changed in training"


def run_pipeline(dmp, num_batches: int) -> None:
    """TrainPipelineSparseDist over a few batches: every batch runs, the first output equals the
    unsharded model's, all outputs are finite."""
    batches = [batch(400 + 10 * dist.get_rank() + i) for i in range(num_batches)]
    _, want_first = reference_model(SEED)(batches[0])
    pipeline = TrainPipelineSparseDist(dmp, optimizer(dmp), device=CPU, execute_all_batches=True)
    stream = iter(batches)
    outputs = [pipeline.progress(stream)]
    torch.testing.assert_close(outputs[0], want_first, rtol=1e-5, atol=1e-6)
    while True:
        try:
            outputs.append(pipeline.progress(stream))
        except StopIteration:
            break
    assert len(outputs) == len(batches), len(outputs)
    assert all(torch.isfinite(o).all() for o in outputs)


def check_pipeline(kind: str) -> None:
    run_pipeline(wrap(kind, SEED), 4)


def check_fisher(kind: str) -> None:
    """FisherCollector on the sharded collection (its LazyAwaitable output), summed over the
    ranks, equals the per-sample definition on the unsharded model over every rank's batches;
    the fused optimizer never steps and no parameter gets a gradient."""
    dmp = wrap(kind, SEED)
    before = {k: local_values(v) for k, v in dmp.state_dict().items()}
    rank, world = dist.get_rank(), dist.get_world_size()
    collector = FisherCollector(dmp.module.sparse, FEATURES)
    with collector:
        for i in range(2):
            loss, _ = dmp(batch(500 + 10 * rank + i))
            collector.accumulate(loss * BATCH_SIZE)  # the model's loss is the batch mean
    collector.all_reduce()
    got = collector.fisher()
    reference = reference_model(SEED)
    want = {f: torch.zeros(DIM_OF[f], DIM_OF[f], dtype=torch.float64) for f in FEATURES}
    seeds = [500 + 10 * r + i for r in range(world) for i in range(2)]
    for seed in seeds:
        b = batch(seed)
        pooled = reference.sparse(b.sparse_features).to_dict()
        for row in range(BATCH_SIZE):
            leaves = [pooled[f][row : row + 1].detach().requires_grad_() for f in FEATURES]
            logit = reference.head(torch.cat(leaves, dim=1)).squeeze(-1)
            label = b.labels[row : row + 1]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, label)
            for f, g in zip(FEATURES, torch.autograd.grad(loss, leaves), strict=True):
                want[f] += g.double().T @ g.double()
    assert collector.num_samples == len(seeds) * BATCH_SIZE, collector.num_samples
    assert sorted(got) == sorted(FEATURES), sorted(got)
    for f in FEATURES:
        torch.testing.assert_close(got[f], want[f] / collector.num_samples, rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in dmp.parameters())
    for key, value in dmp.state_dict().items():
        assert torch.equal(local_values(value), before[key]), f"{key} changed"


def sharding_body(recorder: CheckRecorder, kinds: list[str]) -> None:
    """Forward equality and training for each plan kind, the pipeline, and the loading paths."""
    for kind in kinds:
        recorder.run(f"forward[{kind}]", check_forward, kind)
        recorder.run(f"training[{kind}]", check_training, kind)
        if kind in ("table_wise", "planner"):
            recorder.run(f"pipeline[{kind}]", check_pipeline, kind)
        if kind in ("table_wise", "row_wise"):
            recorder.run(f"fisher[{kind}]", check_fisher, kind)
    recorder.run("zero_codes_before_loading", check_zero_codes, "row_wise")
    recorder.run("codes_broadcast_from_rank_0", check_codes_broadcast, "table_wise")
    recorder.run("load_compressed_tables", check_load_tables, "row_wise")


def check_zero_codes(kind: str) -> None:
    state = wrap(kind).state_dict()
    codes = [v for k, v in state.items() if k.startswith("sparse.codes.")]
    assert codes and all(int(c.count_nonzero()) == 0 for c in codes)


def check_codes_broadcast(kind: str) -> None:
    """A module built on each rank (not meta) draws its own codes; sharding keeps rank 0's."""
    torch.manual_seed(dist.get_rank())
    model = TinyModel(MECEmbeddingBagCollection(TABLES, COMPRESSION))
    mine = {n: b.clone() for n, b in model.sparse.codes.named_buffers()}
    rank0 = {n: b.clone() for n, b in mine.items()}
    for codes in rank0.values():
        dist.broadcast(codes, src=0)
    assert dist.get_rank() == 0 or any(not torch.equal(mine[n], rank0[n]) for n in mine)
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=CPU,
        plan=plan(kind, dist.get_world_size(), dist.group.WORLD), sharders=sharders(),
    )
    state = dmp.state_dict()
    for name, codes in rank0.items():
        assert torch.equal(state[f"sparse.codes.{name}"], codes), name


def check_load_tables(kind: str) -> None:
    dmp = wrap(kind)
    load_mec_state(dmp, compressed_tables(SEED))
    seed = 500 + dist.get_rank()
    got = pooled(dmp, seed).to_dict()
    want = reference_mec(SEED)(batch(seed).sparse_features).to_dict()
    for feature in ("f_a", "f_a2", "f_b"):  # compressed features only: t_c was not given
        torch.testing.assert_close(got[feature], want[feature], rtol=1e-5, atol=1e-6)


def dcp_body(recorder: CheckRecorder, steps: list[tuple[str, str, str, int]]) -> None:
    """Runs checkpoint steps `(action, checkpoint_dir, plan_kind, seed)` in order, action being
    "save" (a DMP model filled from `reference_model(seed)`) or "load" (into a fresh DMP model,
    then compared with that reference). Check names: "save:<dir name>", "load:<dir name>"."""
    for action, checkpoint, kind, seed in steps:
        check = save_checkpoint if action == "save" else load_checkpoint
        recorder.run(f"{action}:{Path(checkpoint).name}", check, checkpoint, kind, seed)


def save_checkpoint(checkpoint: str, kind: str, seed: int) -> None:
    dcp.save(wrap(kind, seed).state_dict(), checkpoint_id=Path(checkpoint))


def load_into(dmp: DistributedModelParallel, checkpoint: str, seed: int) -> torch.nn.Module:
    """Load `checkpoint` into a fresh `dmp` (which must not already match) and check it then
    serves like the unsharded reference model of `seed`; returns that reference."""
    probe = batch(600 + dist.get_rank())
    reference = reference_model(seed)
    _, want = reference(probe)
    _, fresh = dmp(probe)
    assert not torch.allclose(fresh, want), "fresh model already matches: test proves nothing"
    state = dmp.state_dict()
    dcp.load(state, checkpoint_id=Path(checkpoint))
    dmp.load_state_dict(state)
    _, got = dmp(probe)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    return reference


def load_checkpoint(checkpoint: str, kind: str, seed: int) -> None:
    dmp = wrap(kind)
    reference = load_into(dmp, checkpoint, seed)
    loaded = dmp.state_dict()
    for name, codes in reference.sparse.codes.named_buffers():
        assert torch.equal(loaded[f"sparse.codes.{name}"], codes), name


# -- sharded code tables (tests/test_distributed_codes*.py) --------------------------------------


def wrap_codes(
    kind: str,
    codes_kind: str,
    seed: int | None,
    pooling: PoolingType = PoolingType.SUM,
    is_weighted: bool = False,
) -> DistributedModelParallel:
    """`wrap` with codebooks planned `kind` and the compressed tables' codes `codes_kind`."""
    meta = torch.device("meta")
    model = TinyModel(variant_mec(None, pooling, is_weighted, device=meta), device=meta)
    world = dist.get_world_size()
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=CPU,
        plan=with_codes(plan(kind, world, dist.group.WORLD), codes_kind, world),
        sharders=sharders(),
    )
    if seed is not None:
        load_mec_state(dmp, reference_model(seed).state_dict())
    return dmp


def assert_close_to_full(value: torch.Tensor, full: torch.Tensor, key: str) -> None:
    """This rank's part of a state-dict entry equals the matching slice of the full tensor."""
    if not isinstance(value, ShardedTensor):
        torch.testing.assert_close(value, full, rtol=1e-5, atol=1e-6, msg=key)
        return
    for shard in value.local_shards():
        (r, c), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        want = full[r : r + rows, c : c + cols]
        torch.testing.assert_close(shard.tensor, want, rtol=1e-5, atol=1e-6, msg=key)


def check_codes_forward(
    kind: str, codes_kind: str, pooling: PoolingType, is_weighted: bool
) -> None:
    dmp = wrap_codes(kind, codes_kind, SEED, pooling, is_weighted)
    reference = variant_mec(SEED, pooling, is_weighted)
    rank = dist.get_rank()
    inputs = [
        spread_features(),
        batch(100 + 10 * rank).sparse_features,
        spread_features(empty=rank == 1),  # rank 1 sends no ids, others do
    ]
    for i, features in enumerate(inputs):
        if is_weighted:
            features = weighted(features, 50 + 10 * rank + i)
        out = dmp.module.sparse(features)
        got = (out.wait() if isinstance(out, LazyAwaitable) else out).to_dict()
        want = reference(features).to_dict()
        assert sorted(got) == sorted(want), (list(got), list(want))
        for feature, tensor in want.items():
            torch.testing.assert_close(got[feature], tensor, rtol=1e-5, atol=1e-6)
    sparse = dmp.module.sparse
    for table in COMPRESSED:  # each rank holds its rows only
        full = sparse.codes.full_shape(table)
        start, rows = sparse.codes.local_rows(table)
        assert getattr(sparse.codes, table).shape == (rows, full[1])
        want = reference.codes.get_buffer(table)[start : start + rows]
        assert torch.equal(getattr(sparse.codes, table), want), table
        if codes_kind == "table_wise":
            assert rows == (full[0] if rank == 1 % dist.get_world_size() else 0)
        else:
            assert rows <= -(-full[0] // dist.get_world_size())


def check_codes_training(kind: str, codes_kind: str) -> None:
    """3 steps on each rank's batch equal 3 unsharded SGD steps on the mean of the ranks' losses
    (DDP averages dense and data-parallel gradients; TorchRec's output all-to-all divides
    model-parallel tables' gradients by the world size)."""
    dmp = wrap_codes(kind, codes_kind, SEED)
    reference = reference_model(SEED)
    opt = optimizer(dmp)
    world, rank = dist.get_world_size(), dist.get_rank()
    for step in range(3):
        loss, _ = dmp(batch(300 + 10 * rank + step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = sum(reference(batch(300 + 10 * r + step))[0] for r in range(world)) / world
        mean.backward()
        with torch.no_grad():
            for param in reference.parameters():
                param -= LR * param.grad
                param.grad = None
    after, want = dmp.state_dict(), reference.state_dict()
    keys = [k for k in want if k.startswith("sparse.codebooks.")]
    for key in keys:
        assert_close_to_full(after[key], want[key], key)
    for key in (k for k in want if k.startswith("sparse.codes.")):
        assert_close_to_full(after[key], want[key], key)


def check_codes_load_tables(kind: str, codes_kind: str) -> None:
    dmp = wrap_codes(kind, codes_kind, None)
    load_mec_state(dmp, compressed_tables(SEED))
    features = spread_features()
    out = dmp.module.sparse(features)
    got = (out.wait() if isinstance(out, LazyAwaitable) else out).to_dict()
    want = reference_mec(SEED)(features).to_dict()
    for feature in ("f_a", "f_a2", "f_b"):  # compressed features only: t_c was not given
        torch.testing.assert_close(got[feature], want[feature], rtol=1e-5, atol=1e-6)


def check_codes_state_dict(kind: str, codes_kind: str) -> None:
    state = wrap_codes(kind, codes_kind, SEED).state_dict()
    reference = reference_mec(SEED)
    for table in COMPRESSED:
        value = state[f"sparse.codes.{table}"]
        assert isinstance(value, ShardedTensor), type(value)
        assert tuple(value.size()) == tuple(reference.codes.get_buffer(table).shape)
        assert_close_to_full(value, reference.codes.get_buffer(table), table)


def check_codes_planner() -> None:
    """A plan from make_planner (codes overridden: t_a row_wise, t_b table_wise) shards and
    serves like the unsharded module."""
    world = dist.get_world_size()
    planner = make_planner(
        Topology(world_size=world, compute_device="cpu"),
        BATCH_SIZE,
        codes_sharding={"t_a": "row_wise", "t_b": "table_wise"},
    )
    made = planner.collective_plan(meta_model(), sharders(), dist.group.WORLD)
    assert made.plan["sparse"]["codes.t_a"].ranks == list(range(world))
    dmp = DistributedModelParallel(
        meta_model(),
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=CPU,
        plan=made,
        sharders=sharders(),
    )
    load_mec_state(dmp, reference_model(SEED).state_dict())
    assert sorted(dmp.module.sparse.codes.sharded_tables) == ["t_a", "t_b"]
    features = spread_features()
    out = dmp.module.sparse(features)
    got = (out.wait() if isinstance(out, LazyAwaitable) else out).to_dict()
    for feature, tensor in reference_mec(SEED)(features).to_dict().items():
        torch.testing.assert_close(got[feature], tensor, rtol=1e-5, atol=1e-6)


def codes_body(recorder: CheckRecorder, cases: list[tuple[str, ...]]) -> None:
    """Runs `(check, codebook kind, codes kind, ...)` cases; check names join the fields by ':'."""
    checks = {
        "forward": lambda kind, codes, pooling, w: check_codes_forward(
            kind, codes, PoolingType[pooling], w == "weighted"
        ),
        "training": check_codes_training,
        "load_tables": check_codes_load_tables,
        "state_dict": check_codes_state_dict,
        "planner": check_codes_planner,
        "export": check_codes_export,
        "pipeline": check_codes_pipeline,
        "bad_plans": check_codes_bad_plans,
        "fetch_mixed": check_codes_fetch_mixed_tables,
    }
    for case in cases:
        recorder.run(":".join(case), checks[case[0]], *case[1:])


def codes_dcp_body(recorder: CheckRecorder, steps: list[tuple[str, str, str, str, int]]) -> None:
    """`dcp_body` with the codes placed too: steps `(action, checkpoint_dir, codebook kind,
    codes kind, seed)`; check names "save:<dir name>", "load:<dir name>"."""
    for action, checkpoint, kind, codes_kind, seed in steps:
        check = save_codes_checkpoint if action == "save" else load_codes_checkpoint
        recorder.run(
            f"{action}:{Path(checkpoint).name}", check, checkpoint, kind, codes_kind, seed
        )


def save_codes_checkpoint(checkpoint: str, kind: str, codes_kind: str, seed: int) -> None:
    dcp.save(wrap_codes(kind, codes_kind, seed).state_dict(), checkpoint_id=Path(checkpoint))


def load_codes_checkpoint(checkpoint: str, kind: str, codes_kind: str, seed: int) -> None:
    dmp = wrap_codes(kind, codes_kind, None)
    reference = load_into(dmp, checkpoint, seed)
    loaded, expected = dmp.state_dict(), reference.state_dict()
    for key in (k for k in expected if k.startswith("sparse.")):
        assert_close_to_full(loaded[key], expected[key], key)


def check_codes_export(kind: str, codes_kind: str) -> None:
    """A live model with sharded codes, gathered on rank 0, exports the unsharded artifact."""
    state = gathered_state_dict(wrap_codes(kind, codes_kind, SEED), prefix="sparse.")
    if dist.get_rank() != 0:
        assert state is None
        return
    features = {t.name: list(t.feature_names) for t in TABLES}
    with tempfile.TemporaryDirectory() as root:
        export_model(state, Path(root, "sharded"), feature_names=features)
        export_model(reference_mec(SEED), Path(root, "unsharded"))
        got, want = (read_manifest(Path(root, p)) for p in ("sharded", "unsharded"))
        assert [t.name for t in got.tables] == [t.name for t in want.tables]
        for a, b in zip(got.tables, want.tables):
            mine = read_table(Path(root, "sharded"), a, verify=True)
            theirs = read_table(Path(root, "unsharded"), b, verify=True)
            assert mine.keys() == theirs.keys(), a.name
            for key, tensor in theirs.items():
                assert torch.equal(mine[key], tensor), (a.name, key)


def check_codes_pipeline(kind: str, codes_kind: str) -> None:
    """TrainPipelineSparseDist runs sharded codes; its first output equals the unsharded model's."""
    run_pipeline(wrap_codes(kind, codes_kind, SEED), 3)


def check_codes_bad_plans() -> None:
    """Plan entries that do not tile the codes, or name no compressed table, are refused by name."""
    world = dist.get_world_size()
    codes = reference_mec(SEED).codes
    short = {"t_a": codes_sharding(96, 2, "row_wise", list(range(world)))}  # t_a has 97 rows
    try:
        ShardedCodes(codes, short, dist.group.WORLD, CPU)
    except ValueError as e:
        assert "codes.t_a" in str(e) and "97" in str(e), e
    else:
        raise AssertionError("codes shards of 96 rows accepted for a 97-row table")
    try:
        ShardedCodes(codes, {"t_c": codes_sharding(23, 1, "row_wise", [0])}, dist.group.WORLD, CPU)
    except KeyError as e:
        assert "t_c" in str(e), e
    else:
        raise AssertionError("codes placement of the full table t_c accepted")


def check_codes_fetch_mixed_tables() -> None:
    """One exchange serves tables of different L and code dtypes, and a table smaller than the
    world (some ranks hold none of its rows)."""
    g = torch.Generator().manual_seed(5)
    full = {
        "t_x": torch.randint(0, 1000, (50, 3), generator=g, dtype=torch.int16),
        "t_y": torch.randint(0, 256, (31, 2), generator=g).to(torch.uint8),
        "t_z": torch.randint(0, 256, (2, 2), generator=g).to(torch.uint8),
    }
    container = torch.nn.Module()
    for name, codes in full.items():
        container.register_buffer(name, codes)
    world = dist.get_world_size()
    plans = {
        "t_x": codes_sharding(50, 3, "row_wise", list(range(world))),
        "t_y": codes_sharding(31, 2, "table_wise", [world - 1]),
        "t_z": codes_sharding(2, 2, "row_wise", list(range(world))),
    }
    sharded = ShardedCodes(container, plans, dist.group.WORLD, CPU)
    mine = torch.Generator().manual_seed(10 + dist.get_rank())
    count = 7 * (dist.get_rank() + 1)
    ids = [torch.randint(0, len(c), (count,), generator=mine) for c in full.values()]
    got = sharded.fetch(ids, list(full))
    for (name, codes), part, rows in zip(full.items(), ids, got):
        assert rows.dtype == codes.dtype, (name, rows.dtype)
        assert torch.equal(rows, codes[part]), name


# -- fused data-parallel codebooks (tests/test_distributed_data_parallel.py) ----------------------


def dense_optimizer(dmp: DistributedModelParallel, name: str) -> CombinedOptimizer:
    make = {
        "sgd": lambda params: torch.optim.SGD(params, lr=LR),
        "adagrad": lambda params: torch.optim.Adagrad(params, lr=LR),
    }[name]
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), make)
    return CombinedOptimizer([dmp.fused_optimizer, dense])


def check_fused_path_taken(kind: str) -> None:
    fused = wrap(kind, SEED).module.sparse
    assert wrap(kind, SEED, kernel="tbe").module.sparse.fused_tables is None
    tables = fused.fused_tables
    assert tables is not None
    features = batch(500).sparse_features
    stock, _ = tables.split(features)
    sub_features = ["f_a@0", "f_a@1", "f_a2@0", "f_a2@1", "f_b@0", "f_b@1"]
    assert all(stock[f].values().numel() == 0 for f in sub_features), stock
    calls = tables.calls
    out = fused(features)
    out = out.wait() if isinstance(out, LazyAwaitable) else out
    assert tables.calls == calls + 1


def check_fused_forward_equals_stock(kind: str) -> None:
    fused, stock = wrap(kind, SEED), wrap(kind, SEED, kernel="tbe")
    for i in range(3):
        seed = 600 + 10 * dist.get_rank() + i
        got, want = pooled(fused, seed).to_dict(), pooled(stock, seed).to_dict()
        assert sorted(got) == sorted(want), (list(got), list(want))
        for feature, tensor in want.items():
            torch.testing.assert_close(got[feature], tensor, rtol=1e-6, atol=1e-6)


def check_fused_training_equals_stock(kind: str, optimizer_name: str) -> None:
    models = [wrap(kind, SEED), wrap(kind, SEED, kernel="tbe")]
    optimizers = [dense_optimizer(m, optimizer_name) for m in models]
    for step in range(3):
        for model, opt in zip(models, optimizers):
            loss, _ = model(batch(700 + 10 * dist.get_rank() + step))
            loss.backward()
            opt.step()
            opt.zero_grad()
    got, want = (m.state_dict() for m in models)
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(
            local_values(got[key]), local_values(want[key]), rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}"
        )


def check_fused_without_other_tables() -> None:
    """A module of compressed tables only: no feature is left for the remap."""
    tables = [t for t in TABLES if t.name in COMPRESSION]
    sharder = sharders()[-1]
    meta = MECEmbeddingBagCollection(tables, COMPRESSION, device=torch.device("meta"))
    module_plan = construct_module_sharding_plan(
        meta,
        {name: data_parallel() for name in sharder.shardable_parameters(meta)},
        sharder=sharder,
        local_size=dist.get_world_size(),
        world_size=dist.get_world_size(),
        device_type="cpu",
    )
    dmp = DistributedModelParallel(
        torch.nn.ModuleDict({"sparse": meta}),
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=CPU,
        plan=ShardingPlan({"sparse": module_plan}),
        sharders=sharders(),
    )
    reference = MECEmbeddingBagCollection(tables, COMPRESSION)
    load_mec_state(reference, compressed_tables(SEED))
    load_mec_state(dmp, compressed_tables(SEED))
    sharded = dmp.module.sparse
    assert sharded.fused_tables is not None
    features = batch(800 + dist.get_rank()).sparse_features
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["f_a", "f_a2", "f_b"],
        values=torch.cat([features[f].values() for f in ("f_a", "f_a2", "f_b")]),
        lengths=torch.cat([features[f].lengths() for f in ("f_a", "f_a2", "f_b")]),
    )
    got = sharded(features)
    got = (got.wait() if isinstance(got, LazyAwaitable) else got).to_dict()
    for feature, tensor in reference(features).to_dict().items():
        torch.testing.assert_close(got[feature], tensor, rtol=1e-6, atol=1e-6)


def data_parallel_body(recorder: CheckRecorder, kinds: list[str]) -> None:
    recorder.run("only_compressed_tables", check_fused_without_other_tables)
    for kind in kinds:
        recorder.run(f"path[{kind}]", check_fused_path_taken, kind)
        recorder.run(f"forward[{kind}]", check_fused_forward_equals_stock, kind)
        for name in ("sgd", "adagrad"):
            recorder.run(f"training[{kind},{name}]", check_fused_training_equals_stock, kind, name)
