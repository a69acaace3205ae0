"""DLRM with MEC embedding compression: pretrain -> compress -> train, on one or many ranks.

    python -m apps.dlrm.main --spec specs/synthetic.yaml --out out/synthetic [--stage all] [--resume]
    torchrun --nproc_per_node 2 -m apps.dlrm.main --spec specs/synthetic.yaml --out out/synthetic
    torchx run -s local_cwd apps/components.py:dlrm_mec --spec specs/synthetic.yaml --out DIR -j 1x2

1. pretrain: DLRM / DLRM_DCN with full tables under DistributedModelParallel; the state with the
   best valid AUC is kept (``DIR/pretrain/best``) and evaluated on test.
2. compress: every table with at least ``min_rows`` rows is quantized with MEC (or plain PQ),
   weighted by its train-split id counts; tables are split across ranks and each is saved
   atomically (``DIR/compress/t_*.safetensors``), so a rerun skips the tables already done.
3. train: the same model with a MECEmbeddingBagCollection (codes frozen, codebooks from stage 2,
   trained), sharded with the MEC sharder; one run per ``retrain.variants`` entry (``warm``:
   dense layers and small tables from stage 1; ``cold``: dense layers from scratch). The untrained
   warm model is evaluated too (``mec_no_retrain``).

Each stage writes ``DIR/<stage>/result.json``; rank 0 then rewrites ``DIR/report.json`` and the
plots from whatever results exist. Without ``--resume`` a requested stage starts over; an attempt
restarted by torchrun's agent (``TORCHELASTIC_RESTART_COUNT`` > 0) always resumes. Before any
work, ``DIR`` must be writable and hold the checkpoints the requested stages will write.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig
from torchrec.distributed.planner import Topology
from torchrec.distributed.sharding_plan import get_default_sharders as torchrec_sharders

from apps.dlrm import checkpoint, faults, report
from apps.dlrm.loop import StageData, train_stage
from apps.dlrm.model import (
    Env,
    build_dlrm,
    collect_fisher,
    describe_plan,
    full_ebc,
    make_optimizer,
    plan_and_shard,
    register_embedding_optimizer,
    table_configs,
)
from apps.dlrm.spec import JobSpec, SpecError, load_job_spec, spec_to_dict
from mec_torchrec.data import DataError, ProcessedDataset, load_dataset_spec, prepare_dataset
from mec_torchrec.io import (
    StorageError,
    atomic_write_bytes,
    atomic_write_text,
    check_output_dir,
    file_sha256,
)

STAGES = ("pretrain", "compress", "train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="apps.dlrm.main", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="job spec (YAML), e.g. specs/synthetic.yaml")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, report, plots)")
    parser.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    parser.add_argument("--resume", action="store_true", help="continue from DIR's checkpoints")
    return parser.parse_args(argv)


def init_distributed() -> Env:
    """Join the torchrun/torchx process group, or make a one-rank group when run alone."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        store = None
    else:
        rank, world, local_rank, local_world = 0, 1, 0, 1
        store = dist.HashStore()  # one process: an in-memory store, no port to pick
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
    )
    return Env(rank, world, local_world, device, backend)


def log_for(env: Env) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if env.is_main:
            print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    return log


def load_data(spec: JobSpec, out: Path, env: Env) -> ProcessedDataset:
    """Prepare the dataset once (rank 0) and open it on every rank.

    A data error on rank 0 is sent to every rank, so all of them stop with it (none waits).
    """
    data_dir = Path(spec.data_dir) if spec.data_dir else out / "data"
    box: list[str | None] = [None]
    if env.is_main:
        try:
            prepare_dataset(load_dataset_spec(spec.data), data_dir)
        except (DataError, FileNotFoundError) as e:
            box = [str(e)]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise DataError(box[0])
    return ProcessedDataset(data_dir)


def stage_data(ds: ProcessedDataset, env: Env) -> StageData:
    def batches(split: str, batch_size: int, shuffle: bool, seed: int):
        return ds.batches(
            split,
            batch_size,
            rank=env.rank,
            world_size=env.world_size,
            seed=seed,
            shuffle=shuffle,
            drop_last=split == "train",
            even=True,
        )

    return StageData(batches, ds.num_rows("train"), ds.num_rows("valid"), ds.num_rows("test"))


def fresh(path: Path, resume: bool, env: Env) -> None:
    """Start a stage over (remove its folder) unless resuming."""
    if env.is_main and not resume and path.exists():
        shutil.rmtree(path)
    dist.barrier()
    path.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------
# Stage 1: pretrain the full model.


def pretrain(spec: JobSpec, ds: ProcessedDataset, env: Env, out: Path, resume: bool) -> dict:
    work = out / "pretrain"
    fresh(work, resume, env)
    t = spec.training
    torch.manual_seed(t.seed)
    tables = table_configs(ds.feature_names, ds.num_embeddings, spec.model.embedding_dim)
    model = build_dlrm(full_ebc(tables), spec.model, len(ds.dense_names))
    register_embedding_optimizer(model.model.sparse_arch.parameters(), t, t.embedding_lr)
    dmp, plan = plan_and_shard(model, env, torchrec_sharders(), None, t.batch_size)
    log = log_for(env)
    for line in describe_plan(plan):
        log(f"[pretrain] plan {line}")
    optimizer = make_optimizer(dmp, t, t.dense_lr)
    result = train_stage(
        "pretrain", dmp, optimizer, stage_data(ds, env), t, env, work, resume, log=log
    )
    result["embedding_bytes"] = sum(c.num_embeddings * c.embedding_dim * 4 for c in tables)
    return result


# ---------------------------------------------------------------------------------------------
# Stage 2: compress the large tables.


def table_key(name: str) -> str:
    """A full table's weight in the pretrained model's state dict (as saved in checkpoints)."""
    return f"model.sparse_arch.embedding_bag_collection.embedding_bags.{name}.weight"


def compress(spec: JobSpec, ds: ProcessedDataset, env: Env, out: Path, resume: bool) -> dict:
    from mec_torchrec import quantize

    work = out / "compress"
    fresh(work, resume, env)
    c = spec.compression
    tables = table_configs(ds.feature_names, ds.num_embeddings, spec.model.embedding_dim)
    big = sorted(
        (t for t in tables if t.num_embeddings >= c.min_rows), key=lambda t: -t.num_embeddings
    )
    # Largest first onto the least loaded rank: ranks quantize their tables in parallel.
    load, owner = [0] * env.world_size, {}
    for t in big:
        owner[t.name] = min(range(env.world_size), key=load.__getitem__)
        load[owner[t.name]] += t.num_embeddings

    def settings(name: str) -> dict[str, Any]:  # what table ``name`` is made with
        made_with = {
            "method": c.method,
            "num_subspaces": c.subspaces(name),
            "codebook_size": c.codebook_size,
            "quantizer": c.quantizer,
            "exact_rows": c.exact_rows,
        }
        if c.fisher_samples:  # absent when off: tables made before the option stay valid
            fisher_bytes = fisher[name].contiguous().numpy().tobytes()
            made_with["fisher"] = {
                "samples": c.fisher_samples,
                "ridge": c.fisher_ridge,
                "sha256": hashlib.sha256(fisher_bytes).hexdigest(),
            }
        return made_with

    if env.is_main:  # tables a changed min_rows no longer compresses: stage 3 must not load them
        names = {t.name for t in big}
        for stale in work.glob("t_*.*"):
            if stale.stem not in names:
                stale.unlink()
    best = out / "pretrain" / "best"
    checkpoint.require(best)  # all ranks hash a share; then each reads its tables alone
    fisher = table_fisher(spec, ds, env, out, big) if c.fisher_samples else {}
    done = 0
    for t in big:
        if owner[t.name] != env.rank:
            continue
        weight = torch.empty(t.num_embeddings, t.embedding_dim)
        checkpoint.load_local(best, {"model": {table_key(t.name): weight}})
        counts = ds.counts(t.feature_names[0])
        inputs = inputs_sha256(weight, counts, settings(t.name))
        path, info = work / f"{t.name}.safetensors", work / f"{t.name}.json"
        if resume:
            redo = redo_reason(path, info, inputs)
            if redo is None:
                say(env, f"[compress] {t.name}: done already (input and file checksums match)")
                continue
            say(env, f"[compress] {t.name}: {redo}: quantizing")
        start = time.perf_counter()
        exact = min(c.exact_rows, t.num_embeddings)
        if exact < c.exact_rows:
            say(env, f"[compress] {t.name}: all {exact} rows exact (exact_rows {c.exact_rows})")
        table = quantize.fit_table(
            c.make_quantizer(t.name), weight, counts, exact_rows=exact,
            fisher=fisher.get(t.name), ridge=c.fisher_ridge,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        table.save(path)
        # The record is written last: it marks the table done, with what it was made from.
        record = {**table_summary(table, weight, seconds), "inputs_sha256": inputs}
        atomic_write_text(info, json.dumps({**record, "sha256": file_sha256(path)}))
        say(
            env,
            f"[compress] {t.name}: {t.num_embeddings} rows, {table.compression_ratio:.1f}x, "
            f"{seconds:.1f}s",
        )
        done += 1
        faults.kill_point("compress", done, env.rank)
    dist.barrier()
    return {
        "method": c.method,
        "tables": {t.name: json.loads((work / f"{t.name}.json").read_text()) for t in big},
        "uncompressed": {
            t.name: {
                "rows": t.num_embeddings,
                "dim": t.embedding_dim,
                "full_bytes": t.num_embeddings * t.embedding_dim * 4,
                "bytes": t.num_embeddings * t.embedding_dim * 4,
            }
            for t in tables
            if t.num_embeddings < c.min_rows
        },
    }


def table_fisher(
    spec: JobSpec, ds: ProcessedDataset, env: Env, out: Path, big: list[EmbeddingBagConfig]
) -> dict[str, torch.Tensor]:
    """Per table of ``big``: the empirical Fisher [D, D] (float64) of the stage-1 model's loss
    w.r.t. the table's pooled embedding, over ``compression.fisher_samples`` shuffled train rows
    (rounded up to whole batches, split across the ranks; quantize.FisherCollector).

    Kept in ``compress/fisher.safetensors`` with a checksum of what it is made from (the stage-1
    checkpoint, the sample count, the seed, the tables), so a resumed compress reuses it even on
    another number of ranks, and the tables made with it stay done.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save as save_tensors

    c, t = spec.compression, spec.training
    path = out / "compress" / "fisher.safetensors"
    digest = hashlib.sha256((out / "pretrain" / "best" / checkpoint.MANIFEST).read_bytes())
    made_of = [c.fisher_samples, t.seed, t.batch_size, [cfg.name for cfg in big]]
    digest.update(json.dumps(made_of).encode())
    key = digest.hexdigest()
    if path.exists():
        try:
            with safe_open(path, "pt") as f:
                if (f.metadata() or {}).get("inputs_sha256") == key:
                    say(env, f"[compress] loss metric: reusing {path}")
                    return {cfg.name: f.get_tensor(cfg.name) for cfg in big}
        except (OSError, SafetensorError) as e:  # truncated, not safetensors: made again below
            say(env, f"[compress] loss metric: {path} is unusable ({e}): computing it again")
    start = time.perf_counter()
    tables = table_configs(ds.feature_names, ds.num_embeddings, spec.model.embedding_dim)
    torch.manual_seed(t.seed)
    model = build_dlrm(full_ebc(tables), spec.model, len(ds.dense_names))
    register_embedding_optimizer(model.model.sparse_arch.parameters(), t, 0.0)  # never steps
    dmp, _ = plan_and_shard(model, env, torchrec_sharders(), None, t.batch_size)
    checkpoint.load(out / "pretrain" / "best", {"model": dmp.state_dict()})
    wanted = -(-c.fisher_samples // (env.world_size * t.batch_size))  # batches per rank
    batches = stage_data(ds, env).batches("train", t.batch_size, True, t.seed)
    collector = collect_fisher(dmp, batches, wanted, env.device)
    collector.all_reduce()
    per_feature = collector.fisher()
    fisher = {cfg.name: sum(per_feature[f] for f in cfg.feature_names) for cfg in big}
    if env.is_main:
        meta = {"inputs_sha256": key, "samples": str(collector.num_samples)}
        atomic_write_bytes(path, save_tensors(fisher, metadata=meta))
    dist.barrier()
    say(
        env,
        f"[compress] loss metric: Fisher of {len(big)} tables from {collector.num_samples} "
        f"samples, {time.perf_counter() - start:.1f}s",
    )
    return fisher


def say(env: Env, msg: str) -> None:
    """Log from any rank (compress: each rank reports its own tables)."""
    print(f"{time.strftime('%H:%M:%S')} rank {env.rank} {msg}", file=sys.stderr, flush=True)


def inputs_sha256(weight: torch.Tensor, counts: torch.Tensor, settings: dict[str, Any]) -> str:
    """Checksum of what a compressed table is made from: weights, id counts, quantizer settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for tensor in (weight, counts):
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def redo_reason(path: Path, info: Path, inputs: str) -> str | None:
    """Why a table must be quantized again on resume, or None when its saved file is good."""
    if not info.exists() or not path.exists():
        return "not done"
    try:
        record = json.loads(info.read_text())
    except ValueError:
        return f"{info.name} is unreadable"
    if record.get("inputs_sha256") != inputs:
        return "its inputs changed (pretrained weights, id counts or quantizer settings)"
    if record.get("sha256") != file_sha256(path):
        return f"{path.name} does not match its recorded sha256"
    return None


def table_summary(table: Any, weight: torch.Tensor, seconds: float) -> dict[str, Any]:
    """Sizes, reconstruction error and code usage of one compressed table (for the report)."""
    usage = [
        torch.bincount(table.codes[:, s].long(), minlength=table.codebook_size)
        for s in range(table.num_subspaces)
    ]
    perplexity = []
    for u in usage:
        p = u.double() / u.sum()
        perplexity.append(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
    decoded = table.decode()
    return {
        "rows": table.num_rows,
        "dim": table.dim,
        "num_subspaces": table.num_subspaces,
        "codebook_size": table.codebook_size,
        "full_bytes": table.full_nbytes,
        "bytes": table.nbytes,
        "ratio": table.compression_ratio,
        "mse": float((decoded - weight).pow(2).mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(decoded, weight, dim=1).mean()),
        "perplexity": perplexity,
        "usage": [u.tolist() for u in usage],
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------------------------
# Stage 3: train with MEC tables (codes frozen, codebooks trained).


def retrain(spec: JobSpec, ds: ProcessedDataset, env: Env, out: Path, resume: bool) -> dict:
    result: dict[str, Any] = {"variants": {}}
    for variant in spec.retrain.variants:
        r = retrain_variant(spec, ds, env, out, resume, variant)
        if r["start"] is not None:
            result["no_retrain"] = r["start"]
        result["variants"][variant] = r
    return result


def retrain_variant(
    spec: JobSpec, ds: ProcessedDataset, env: Env, out: Path, resume: bool, variant: str
) -> dict:
    from mec_torchrec.distributed import get_default_sharders, load_mec_state, make_planner
    from mec_torchrec.modules import MECEmbeddingBagCollection, MECTableConfig
    from mec_torchrec.quantize import CompressedTable

    work = out / f"train_{variant}"
    fresh(work, resume, env)
    t, log = spec.retrain, log_for(env)
    compressed = {
        p.stem: CompressedTable.load(p) for p in sorted((out / "compress").glob("t_*.safetensors"))
    }
    tables = table_configs(ds.feature_names, ds.num_embeddings, spec.model.embedding_dim)
    compression = {
        n: MECTableConfig(c.num_subspaces, c.codebook_size) for n, c in compressed.items()
    }
    # Same seed as stage 1: the cold variant's dense layers start like the pretrained ones did.
    torch.manual_seed(t.seed)
    # On the meta device like stage 1: DMP allocates each rank's shards; codes, codebooks and
    # stage-1 weights are loaded into them below.
    mec = MECEmbeddingBagCollection(tables, compression, device=torch.device("meta"))
    model = build_dlrm(mec, spec.model, len(ds.dense_names))
    bags = mec.codebooks.embedding_bags
    codebook_params = [bags[n].weight for n in bags if "@" in n]
    full_params = [bags[n].weight for n in bags if "@" not in n]
    register_embedding_optimizer(codebook_params, t, t.codebook_lr)
    if full_params:
        register_embedding_optimizer(full_params, t, t.embedding_lr)
    topology = Topology(
        world_size=env.world_size,
        compute_device=env.device.type,
        local_world_size=env.local_world_size,
    )
    planner = make_planner(topology, batch_size=t.batch_size)
    dmp, plan = plan_and_shard(model, env, get_default_sharders(), planner, t.batch_size)
    for line in describe_plan(plan):
        log(f"[train_{variant}] plan {line}")

    # Stage-1 weights, read in place into this model's shards under their stage-1 names: small
    # tables always, dense layers when warm. Then codes and codebooks from stage 2.
    wanted = {}
    for key, value in dmp.state_dict().items():
        if ".codes." in key or "@" in key:
            continue
        is_table = ".codebooks.embedding_bags." in key
        if is_table or variant == "warm":
            wanted[key.replace(".codebooks.embedding_bags.", ".embedding_bags.")] = value
    checkpoint.load(out / "pretrain" / "best", {"model": wanted})
    load_mec_state(dmp, compressed)

    dense_lr = t.dense_lr if variant == "warm" or t.cold_dense_lr is None else t.cold_dense_lr
    optimizer = make_optimizer(dmp, t, dense_lr)
    return train_stage(
        f"train_{variant}",
        dmp,
        optimizer,
        stage_data(ds, env),
        t,
        env,
        work,
        resume,
        eval_at_start=variant == "warm",
        log=log,
    )


def on_main(env: Env, check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0; a StorageError it raises is raised on every rank (none waits)."""
    box: list[tuple[int, str] | None] = [None]
    if env.is_main:
        try:
            check()
        except StorageError as e:
            box = [(e.errno, e.strerror)]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise StorageError(*box[0])


def check_table_settings(spec: JobSpec, ds: ProcessedDataset) -> None:
    """Per-table settings must name tables stage 2 compresses (a typo would be ignored)."""
    c = spec.compression
    names = sorted(f"t_{f}" for f in ds.feature_names if ds.num_embeddings[f] >= c.min_rows)
    unknown = sorted(set(c.num_subspaces_per_table) - set(names))
    if unknown:
        raise DataError(
            f"compression.num_subspaces_per_table: {unknown} are not compressed tables "
            f"(the tables of >= min_rows {c.min_rows} ids: {names})"
        )


def output_bytes(spec: JobSpec, ds: ProcessedDataset, stages: list[str]) -> int:
    """A lower bound on the peak bytes ``stages`` write: model weights, no optimizer state.

    A training stage holds ``best``, ``last``, ``last.prev`` and the ``last`` being written (4
    copies of the weights); compress writes codes and codebooks; train does so per variant.
    """
    dim, c = spec.model.embedding_dim, spec.compression
    rows = [ds.num_embeddings[f] for f in ds.feature_names]
    full = sum(rows) * dim * 4
    code_bytes = 1 if c.codebook_size <= 256 else 2
    codebooks = c.codebook_size * dim * 4
    compressed = sum(
        n * c.subspaces(f"t_{f}") * code_bytes + codebooks
        for f, n in zip(ds.feature_names, rows, strict=True)
        if n >= c.min_rows
    )
    small = sum(n * dim * 4 for n in rows if n < c.min_rows)
    sizes = {
        "pretrain": 4 * full,
        "compress": compressed,
        "train": 4 * (compressed + small) * len(spec.retrain.variants),
    }
    return sum(sizes[s] for s in stages)


# The spec sections each stage's result depends on (besides the artifacts of the stages before).
STAGE_SPEC = {
    "pretrain": ("data", "data_dir", "model", "training"),
    "compress": ("compression",),
    "train": ("model", "retrain"),
}


def stage_inputs(stage: str, spec: JobSpec, out: Path) -> str:
    """Checksum of what a stage's result is made from: its spec sections and the files it reads.

    ``--resume`` skips a finished stage only when this matches the one in its ``result.json``.
    """
    sections = {key: spec_to_dict(spec)[key] for key in STAGE_SPEC[stage]}
    digest = hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode())
    if stage != "pretrain":
        digest.update((out / "pretrain" / "best" / checkpoint.MANIFEST).read_bytes())
    if stage == "train":
        for info in sorted((out / "compress").glob("t_*.json")):
            digest.update(json.loads(info.read_text()).get("sha256", "").encode())
    return digest.hexdigest()


def _missing_inputs(out: Path, stage: str) -> str | None:
    """What a stage run alone needs from the stages before it, if absent."""
    if stage in ("compress", "train") and not checkpoint.exists(out / "pretrain" / "best"):
        return str(out / "pretrain" / "best")
    if stage == "train" and not (out / "compress" / "result.json").exists():
        return str(out / "compress" / "result.json")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = load_job_spec(args.spec)
    except SpecError as e:
        print(f"apps.dlrm.main: error: {e}", file=sys.stderr)
        return 2
    try:
        faults.target()
    except ValueError as e:
        print(f"apps.dlrm.main: error: {e}", file=sys.stderr)
        return 2
    env = init_distributed()
    log = log_for(env)
    out = Path(args.out)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    # A restarted attempt continues from the checkpoints the failed one left.
    resume = args.resume or restarts > 0
    log(f"world size {env.world_size}, device {env.device}, backend {env.backend}")
    if restarts:
        log(f"restart {restarts} by torchrun's agent: resuming from {out}")
    stages = STAGES if args.stage == "all" else (args.stage,)
    try:
        on_main(env, lambda: check_output_dir(out))
        ds = load_data(spec, out, env)
        missing = _missing_inputs(out, stages[0])
        if missing:
            raise DataError(f"--stage {stages[0]} needs {missing}: run the earlier stages first")
        todo = [s for s in stages if not (resume and (out / s / "result.json").exists())]
        check_table_settings(spec, ds)
        needed = output_bytes(spec, ds, todo)
        on_main(env, lambda: check_output_dir(out, needed, f"stages {', '.join(todo)}"))
    except (DataError, StorageError) as e:
        log(f"error: {e}")
        dist.destroy_process_group()
        return 2
    if env.is_main:
        atomic_write_text(out / "spec.json", json.dumps(spec_to_dict(spec), indent=1))
    for stage in stages:
        result_path = out / stage / "result.json"
        inputs, stage_resume = stage_inputs(stage, spec, out), resume
        if resume and result_path.exists():
            if json.loads(result_path.read_text()).get("inputs_sha256") == inputs:
                log(f"[{stage}] done already ({result_path}); skipped")
                continue
            log(f"[{stage}] its inputs changed since {result_path} was written: running it again")
            # Compress checks each table's inputs itself; a training stage starts over.
            stage_resume = stage == "compress"
        start = time.perf_counter()
        if stage == "pretrain":
            result = pretrain(spec, ds, env, out, stage_resume)
        elif stage == "compress":
            result = compress(spec, ds, env, out, stage_resume)
        else:
            result = retrain(spec, ds, env, out, stage_resume)
        result["seconds"] = time.perf_counter() - start
        result["inputs_sha256"] = inputs
        if env.is_main:
            atomic_write_text(result_path, json.dumps(result, indent=1))
        dist.barrier()
    if env.is_main:
        summary = report.write(out)
        print(report.table(summary))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
