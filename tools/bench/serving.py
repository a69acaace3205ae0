"""Serving benchmark: MEC artifacts (fp32 / fp16 codebooks) vs torchrec's quantized EBC (int8/4/2).

Same tables for every variant: the 26 Criteo Kaggle cardinalities times ``--scale``, dim
``--dim``, one Zipf id per feature per sample (id 0 the most frequent, as mec_torchrec.data orders
ids). MEC compresses a table when its codes + codebooks are smaller than the fp32 table (L
``--subspaces``, K ``--codebook-size``); the other tables stay full fp32 in the artifact.

  mec-fp32 / mec-fp16  MECInferenceEmbeddingBagCollection loaded (mapped, verified) from an
                       artifact written by export_model with that codebook dtype
  mec-fp16+int8        the same with fp16 codebooks and the tables MEC left full stored and
                       served int8 row-wise (export_model weight_dtype="int8")
  qebc-int8/int4/int2  torchrec.quant EmbeddingBagCollection made by quantize_inference_model
                       with quantization_dtype qint8 / quint4x2 / quint2x4 (FBGEMM IntNBit TBE)

Bytes: MEC = the artifact's blobs on disk (codes counted, safetensors headers included); QEBC =
its weight rows as the kernel stores them (4 bytes of fp16 scale + bias per row, rows padded to
16 bytes). Held: what the serving module keeps in memory (MEC: ``embedding_bytes()``, codebooks
decoded to float32; QEBC: its rows). Latency: one forward per request, per-request wall time, variants interleaved
round-robin so a noisy host hits all of them alike; p50 and p99 per batch size.

    python tools/bench/serving.py --scale 0.05 --dim 64 --batch 1 64 512 --requests 300 \
        [--script] [--clock cpu]

``--model OUT`` (a finished ``apps.dlrm.main`` output folder, e.g. out/demo) also serves the
job's trained DLRM through every variant and prints the AUC and logloss of each on the test split
of the job's data: fp32 = the stage-1 model; qebc-int8/4/2 = its tables quantized by
``quantize_inference_model``; mec-fp32/fp16 = the stage-3 model (``--mec-variant``, warm by
default) exported and served by ``MECInferenceEmbeddingBagCollection``; bytes = all of the model's
embedding tables in each variant's serving form.

``--table-ablation`` (with ``--model``) prints where MEC's AUC goes: the stage-1 fp32 model's test
AUC with each compressed table, then all of them, swapped for its quantized rows (the compress
stage's codes and codebooks, no retraining).

``--load-threads T --load-seconds S`` also runs the concurrent load check
(``mec_torchrec.export.load_test``) on mec-fp32: T threads share the module for S seconds;
errors, outputs that differ from the single-threaded ones, and latency percentiles.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the apps package (--model)
from lookup import compression_for, criteo_tables, zipf_batch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.inference.modules import quantize_inference_model

from mec_torchrec.export import (
    MECInferenceEmbeddingBagCollection,
    export_model,
    load_test,
    script_model,
)
from mec_torchrec.modules import MECEmbeddingBagCollection

QUANT = {"int8": torch.qint8, "int4": torch.quint4x2, "int2": torch.quint2x4}
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


class _Holder(nn.Module):
    """quantize_inference_model swaps children; the EBC has to sit inside a parent."""

    def __init__(self, ebc: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc


def qebc_bytes(qebc: nn.Module) -> int:
    """The FBGEMM kernel's packed rows (its host weights on CPU), not the ``embedding_bags``
    tensors that quantize_inference_model also leaves in the state dict."""
    return sum(t.numel() * t.element_size() for tbe in qebc._emb_modules
               for t in (tbe.weights_host, tbe.weights_dev, tbe.weights_uvm))


def quantized_ebc(tables: list[EmbeddingBagConfig], dtype: str) -> tuple[nn.Module, int]:
    """torchrec's quantized EBC of fresh tables, and the bytes of its stored rows."""
    torch.manual_seed(0)
    holder = _Holder(EmbeddingBagCollection(tables=tables))
    qebc = quantize_inference_model(holder, quantization_dtype=QUANT[dtype]).ebc
    return qebc, qebc_bytes(qebc)


# MEC variants: name -> (codebook dtype, dtype of the tables MEC left full).
MEC_VARIANTS = {"mec-fp32": ("fp32", "fp32"), "mec-fp16": ("fp16", "fp32"),
                "mec-fp16+int8": ("fp16", "int8")}


def mec_serving(tables: list[EmbeddingBagConfig], args: argparse.Namespace, name: str,
                workdir: Path) -> tuple[nn.Module, int]:
    """A MEC artifact of the tables (random codes: timing does not depend on their values)."""
    torch.manual_seed(0)
    mec = MECEmbeddingBagCollection(
        tables, compression_for(tables, args.subspaces, args.codebook_size))
    codebook_dtype, weight_dtype = MEC_VARIANTS[name]
    manifest = export_model(mec, workdir / name, codebook_dtype, weight_dtype=weight_dtype)
    return MECInferenceEmbeddingBagCollection.load(workdir / name), manifest.total_bytes()


def held_bytes(module: nn.Module, stored: int) -> int:
    """What a serving module keeps in memory for its tables (MEC: codebooks as float32)."""
    found = [m for m in module.modules() if isinstance(m, MECInferenceEmbeddingBagCollection)]
    return found[0].embedding_bytes() if found else stored


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(variants: dict[str, Callable[[KeyedJaggedTensor], object]],
            batches: list[KeyedJaggedTensor], warmup: int,
            clock: Callable[[], float]) -> dict[str, list[float]]:
    """Per-request seconds of every variant on ``clock``, one request each in turn."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for i, kjt in enumerate(batches):
            for name, forward in variants.items():
                start = clock()
                forward(kjt)
                elapsed = clock() - start
                if i >= warmup:
                    times[name].append(elapsed)
    return times


def exact_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC by the rank-sum formula, ties sharing their average rank."""
    scores, labels = scores.double(), labels.double()
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # average 1-based rank of each score
    pos = labels.sum()
    neg = labels.numel() - pos
    return float((ranks[labels > 0].sum() - pos * (pos + 1) / 2) / (pos * neg))


def stage1_model(out: Path) -> tuple[nn.Module, object, object, list[EmbeddingBagConfig]]:
    """The job's stage-1 (fp32) DLRM in eval mode, its dataset, spec and table configs."""
    from apps.dlrm import checkpoint
    from apps.dlrm.model import build_dlrm, table_configs
    from apps.dlrm.spec import load_job_spec
    from mec_torchrec.data import ProcessedDataset

    spec = load_job_spec(out / "spec.json")
    ds = ProcessedDataset(Path(spec.data_dir) if spec.data_dir else out / "data")
    tables = table_configs(ds.feature_names, ds.num_embeddings, spec.model.embedding_dim)
    fp32 = build_dlrm(EmbeddingBagCollection(tables=tables), spec.model, len(ds.dense_names))
    checkpoint.load_local(out / "pretrain" / "best", {"model": fp32.state_dict()})
    return fp32.model.eval(), ds, spec, tables  # the DLRM without the training loss


def model_variants(out: Path, mec_variant: str, workdir: Path) -> tuple[dict, object, object]:
    """The job's trained DLRM in every serving form: {name: (DLRM, embedding bytes)}."""
    import copy

    from apps.dlrm import checkpoint
    from apps.dlrm.model import build_dlrm
    from mec_torchrec.modules import MECTableConfig
    from mec_torchrec.quantize import CompressedTable

    fp32, ds, spec, tables = stage1_model(out)
    variants = {"fp32": (fp32, sum(t.num_embeddings * t.embedding_dim * 4 for t in tables))}
    for dtype, qdtype in QUANT.items():
        q = quantize_inference_model(copy.deepcopy(fp32), quantization_dtype=qdtype)
        variants[f"qebc-{dtype}"] = (q, qebc_bytes(q.sparse_arch.embedding_bag_collection))

    compressed = {p.stem: CompressedTable.load(p)
                  for p in sorted((out / "compress").glob("t_*.safetensors"))}
    compression = {n: MECTableConfig(c.num_subspaces, c.codebook_size)
                   for n, c in compressed.items()}
    trained = build_dlrm(MECEmbeddingBagCollection(tables, compression), spec.model,
                         len(ds.dense_names))
    checkpoint.load_local(out / f"train_{mec_variant}" / "best", {"model": trained.state_dict()})
    mec = trained.model.sparse_arch.embedding_bag_collection
    for name, (codebook_dtype, weight_dtype) in MEC_VARIANTS.items():
        path = workdir / f"model-{name}"
        manifest = export_model(mec, path, codebook_dtype, weight_dtype=weight_dtype)
        served = copy.deepcopy(trained.model).eval()
        served.sparse_arch.embedding_bag_collection = MECInferenceEmbeddingBagCollection.load(path)
        variants[name] = (served, manifest.total_bytes())
    return variants, ds, spec


def model_quality(args: argparse.Namespace) -> None:
    """AUC / logloss / bytes of the job's trained model served by every variant (test split)."""
    out = Path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        variants, ds, spec = model_variants(out, args.mec_variant, Path(tmp))
        logits: dict[str, list[torch.Tensor]] = {name: [] for name in variants}
        labels = []
        with torch.inference_mode():
            for batch in ds.batches("test", spec.training.eval_batch_size, shuffle=False):
                labels.append(batch.labels.float())
                for name, (model, _) in variants.items():
                    logits[name].append(
                        model(batch.dense_features, batch.sparse_features).float().view(-1))
    y = torch.cat(labels)
    fp32_bytes = variants["fp32"][1]
    int2_bytes = variants["qebc-int2"][1]
    print(f"\n== {out}: trained DLRM served by each variant, test split ({y.numel():,} rows; "
          f"MEC = train_{args.mec_variant}) ==")
    print("| variant | test AUC | AUC - fp32 | logloss | embedding MiB | vs fp32 | int2 / variant "
          "| held MiB |")
    print("|---|---|---|---|---|---|---|---|")
    aucs: dict[str, float] = {}
    for name, (model, nbytes) in variants.items():
        z = torch.cat(logits[name])
        aucs[name] = auc = exact_auc(z, y)
        logloss = float(torch.nn.functional.binary_cross_entropy_with_logits(z, y))
        print(f"| {name} | {auc:.5f} | {auc - aucs['fp32']:+.5f} | {logloss:.4f} | "
              f"{nbytes / 2**20:.2f} | {fp32_bytes / nbytes:.1f}x smaller | "
              f"{int2_bytes / nbytes:.2f}x | {held_bytes(model, nbytes) / 2**20:.2f} |")
    # Every variant scores the same test rows with the same dense layers: paired differences,
    # with a paired bootstrap interval over the test rows (how far the split can resolve them).
    for name, rival in (("mec-fp32", "fp32"), ("mec-fp32", "qebc-int2"), ("mec-fp32", "qebc-int4"),
                        ("mec-fp16", "qebc-int4"), ("mec-fp16+int8", "qebc-int4")):
        low, high = paired_auc_interval(torch.cat(logits[name]), torch.cat(logits[rival]), y)
        goal = "met" if aucs[name] > aucs[rival] else "missed"
        print(f"{name} - {rival} test AUC: {aucs[name] - aucs[rival]:+.5f} (95 % paired "
              f"bootstrap [{low:+.5f}, {high:+.5f}])"
              + (f"; goal > 0: {goal}" if rival == "qebc-int4" else ""))


def table_ablation(args: argparse.Namespace) -> None:
    """Test AUC of the fp32 model with each compressed table (then all) swapped for its decoded
    stage-2 rows: how much each table's quantization costs before retraining."""
    from mec_torchrec.quantize import CompressedTable, head_rows, reserve_exact_rows

    out = Path(args.model)
    model, ds, spec, _ = stage1_model(out)
    bags = model.sparse_arch.embedding_bag_collection.embedding_bags
    batches = list(ds.batches("test", spec.training.eval_batch_size, shuffle=False))
    labels = torch.cat([b.labels.float() for b in batches])

    def auc() -> float:
        with torch.inference_mode():
            return exact_auc(torch.cat([model(b.dense_features, b.sparse_features).view(-1)
                                        for b in batches]), labels)

    compressed = {p.stem: CompressedTable.load(p)
                  for p in sorted((out / "compress").glob("t_*.safetensors"))}
    original = {name: bags[name].weight.detach().clone() for name in compressed}
    configs = {c.name: c for c in model.sparse_arch.embedding_bag_collection.embedding_bag_configs()}
    counts = {name: ds.counts(configs[name].feature_names[0]) for name in compressed}
    if args.exact_rows:  # as compression.exact_rows would have made them
        compressed = {
            name: reserve_exact_rows(original[name], counts[name], table, args.exact_rows,
                                     spec.compression.make_quantizer(name).refit_weights(counts[name]))
            for name, table in compressed.items()}  # fmt: skip
    decoded = {name: table.decode() for name, table in compressed.items()}
    if args.keep_top:  # the most frequent train ids keep their fp32 rows
        for name, rows in decoded.items():
            top = head_rows(counts[name], args.keep_top)
            rows[top] = original[name][top]
    base = auc()
    kept = f", the {args.keep_top} most frequent ids of each kept fp32" if args.keep_top else ""
    kept += f", {args.exact_rows} exact rows reserved" if args.exact_rows else ""
    print(f"\n== {out}: fp32 test AUC {base:.5f} with compressed tables swapped in (no retraining"
          f"{kept}) ==")
    print("| swapped | test AUC | - fp32 |\n|---|---|---|")
    with torch.no_grad():
        for name, rows in decoded.items():
            bags[name].weight.copy_(rows)
            value = auc()
            bags[name].weight.copy_(original[name])
            print(f"| {name} | {value:.5f} | {value - base:+.5f} |")
        for name, rows in decoded.items():
            bags[name].weight.copy_(rows)
        value = auc()
    print(f"| all {len(decoded)} | {value:.5f} | {value - base:+.5f} |")


def paired_auc_interval(
    a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, draws: int = 200, seed: int = 0
) -> tuple[float, float]:
    """2.5 and 97.5 percentiles of AUC(a) - AUC(b) over ``draws`` resamples of the rows (the
    same rows for both: a paired bootstrap)."""
    g = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in range(draws):
        rows = torch.randint(labels.numel(), (labels.numel(),), generator=g)
        diffs.append(exact_auc(a[rows], labels[rows]) - exact_auc(b[rows], labels[rows]))
    q = torch.tensor(diffs, dtype=torch.float64).quantile(torch.tensor([0.025, 0.975],
                                                                       dtype=torch.float64))
    return float(q[0]), float(q[1])


def run_load(args: argparse.Namespace, module: nn.Module, tables: list[EmbeddingBagConfig]) -> None:
    g = torch.Generator().manual_seed(1)
    requests = [zipf_batch(tables, batch, torch.device("cpu"), g)
                for batch in args.batch for _ in range(8)]
    result = load_test(module, requests, args.load_threads, args.load_seconds)
    s = result.summary()
    print(f"\n== load: mec-fp32, {args.load_threads} threads for {args.load_seconds:.0f} s, "
          f"requests of batch {args.batch} ==")
    print(f"requests {s['requests']:,} ({s['requests_per_s']:.0f}/s)  errors {s['errors']}  "
          f"mismatches vs single-threaded {s['mismatches']}  p50 {s['p50_ms']:.3f} ms  "
          f"p90 {s['p90_ms']:.3f} ms  p99 {s['p99_ms']:.3f} ms  max {s['max_ms']:.3f} ms")
    if not result.ok:
        raise SystemExit(f"load check failed: {s['first_failure']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.05, help="cardinality multiplier")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--ids-per-bag", type=int, default=1,
                        help="1: one id per feature (Criteo); k > 1: bags of 1..2k-1 ids")
    parser.add_argument("--subspaces", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--requests", type=int, default=300, help="timed requests per batch size")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: perf_counter; cpu: this thread's CPU time (ignores the time "
                        "a busy shared host keeps the process descheduled)")
    parser.add_argument("--script", action="store_true",
                        help="time TorchScript (torchrec fx + jit.script) modules instead of eager")
    parser.add_argument("--model", default=None,
                        help="a finished apps.dlrm.main output folder: AUC of each variant")
    parser.add_argument("--mec-variant", default="warm", help="which train_<variant> to serve")
    parser.add_argument("--table-ablation", action="store_true",
                        help="with --model: fp32 AUC with each compressed table quantized")
    parser.add_argument("--keep-top", type=int, default=0,
                        help="with --table-ablation: the H most frequent ids keep fp32 rows")
    parser.add_argument("--exact-rows", type=int, default=0,
                        help="with --table-ablation: reserve entries for the H most frequent ids "
                        "(quantize.reserve_exact_rows) before swapping the tables in")
    parser.add_argument("--load-threads", type=int, default=0,
                        help="concurrent load check on mec-fp32 with this many threads")
    parser.add_argument("--load-seconds", type=float, default=10.0)
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        model_quality(args)
        if args.table_ablation:
            table_ablation(args)
    if args.skip_latency and not args.load_threads:
        return
    tables = criteo_tables(args.scale, args.dim)
    rows = sum(t.num_embeddings for t in tables)
    fp32_bytes = rows * args.dim * 4

    modules: dict[str, tuple[nn.Module, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MEC_VARIANTS:
            modules[name] = mec_serving(tables, args, name, Path(tmp))
    for dtype in QUANT:
        modules[f"qebc-{dtype}"] = quantized_ebc(tables, dtype)
    variants = {name: script_model(m) if args.script else m for name, (m, _) in modules.items()}

    compressed = len(compression_for(tables, args.subspaces, args.codebook_size))
    print(f"{len(tables)} tables, {rows:,} rows, D={args.dim}, {compressed} compressed "
          f"(L={args.subspaces}, K={args.codebook_size}); fp32 tables {fp32_bytes / 2**20:.1f} MiB")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {args.threads} thread(s), "
          f"{'TorchScript' if args.script else 'eager'}, {args.clock} clock, "
          f"{args.ids_per_bag} id(s) per bag{' on average' if args.ids_per_bag > 1 else ''}, "
          f"load {os.getloadavg()[0]:.1f}")
    int2_bytes = modules["qebc-int2"][1]
    print("\n| variant | bytes (MiB) | vs fp32 | int2 / variant | held MiB |")
    print("|---|---|---|---|---|")
    for name, (module, stored) in modules.items():
        print(f"| {name} | {stored / 2**20:.2f} | {fp32_bytes / stored:.1f}x smaller | "
              f"{int2_bytes / stored:.2f}x | {held_bytes(module, stored) / 2**20:.2f} |")

    print("\n| batch | variant | p50 ms | p99 ms | p99 / qebc-int8 p99 |")
    print("|---|---|---|---|---|")
    if args.load_threads:
        run_load(args, modules["mec-fp32"][0], tables)
    if args.skip_latency:
        return
    g = torch.Generator().manual_seed(0)
    for batch in args.batch:
        batches = [zipf_batch(tables, batch, torch.device("cpu"), g, args.ids_per_bag)
                   for _ in range(args.requests + args.warmup)]
        times = measure(variants, batches, args.warmup, CLOCKS[args.clock])
        base = percentile(times["qebc-int8"], 0.99)
        for name, samples in times.items():
            p50, p99 = statistics.median(samples), percentile(samples, 0.99)
            print(f"| {batch} | {name} | {p50 * 1e3:.3f} | {p99 * 1e3:.3f} | {p99 / base:.2f}x |")


if __name__ == "__main__":
    main()
