"""Serving benchmark: MEC artifact (fp32 / fp16 codebooks) vs torchrec's quantized EBC (int8/4/2).

Same tables for every variant: the 26 Criteo Kaggle cardinalities times ``--scale``, dim
``--dim``, one Zipf id per feature per sample (id 0 the most frequent, as mec_torchrec.data orders
ids). MEC compresses a table when its codes + codebooks are smaller than the fp32 table (L
``--subspaces``, K ``--codebook-size``); the other tables stay full fp32 in the artifact.

  mec-fp32 / mec-fp16  MECInferenceEmbeddingBagCollection loaded (mapped, verified) from an
                       artifact written by export_model with that codebook dtype
  qebc-int8/int4/int2  torchrec.quant EmbeddingBagCollection made by quantize_inference_model
                       with quantization_dtype qint8 / quint4x2 / quint2x4 (FBGEMM IntNBit TBE)

Bytes: MEC = the artifact's blobs on disk (codes counted, safetensors headers included); QEBC =
its weight rows as the kernel stores them (4 bytes of fp16 scale + bias per row, rows padded to
16 bytes). Latency: one forward per request, per-request wall time, variants interleaved
round-robin so a noisy host hits all of them alike; p50 and p99 per batch size.

    python tools/bench/serving.py --scale 0.05 --dim 64 --batch 1 64 512 --requests 300 \
        [--script] [--clock cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lookup import compression_for, criteo_tables, zipf_batch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.inference.modules import quantize_inference_model

from mec_torchrec.export import MECInferenceEmbeddingBagCollection, export_model, script_model
from mec_torchrec.modules import MECEmbeddingBagCollection

QUANT = {"int8": torch.qint8, "int4": torch.quint4x2, "int2": torch.quint2x4}
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


class _Holder(nn.Module):
    """quantize_inference_model swaps children; the EBC has to sit inside a parent."""

    def __init__(self, ebc: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc


def quantized_ebc(tables: list[EmbeddingBagConfig], dtype: str) -> tuple[nn.Module, int]:
    """torchrec's quantized EBC of fresh tables, and the bytes of its stored rows."""
    torch.manual_seed(0)
    holder = _Holder(EmbeddingBagCollection(tables=tables))
    qebc = quantize_inference_model(holder, quantization_dtype=QUANT[dtype]).ebc
    # The FBGEMM kernel's packed rows (its host weights on CPU), not the ``embedding_bags``
    # tensors that quantize_inference_model also leaves in the state dict.
    stored = sum(t.numel() * t.element_size() for tbe in qebc._emb_modules
                 for t in (tbe.weights_host, tbe.weights_dev, tbe.weights_uvm))
    return qebc, stored


def mec_serving(tables: list[EmbeddingBagConfig], args: argparse.Namespace, codebook_dtype: str,
                workdir: Path) -> tuple[nn.Module, int]:
    """A MEC artifact of the tables (random codes: timing does not depend on their values)."""
    torch.manual_seed(0)
    mec = MECEmbeddingBagCollection(
        tables, compression_for(tables, args.subspaces, args.codebook_size))
    path = workdir / f"mec-{codebook_dtype}"
    manifest = export_model(mec, path, codebook_dtype)
    return MECInferenceEmbeddingBagCollection.load(path), manifest.total_bytes()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.05, help="cardinality multiplier")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 512])
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tables = criteo_tables(args.scale, args.dim)
    rows = sum(t.num_embeddings for t in tables)
    fp32_bytes = rows * args.dim * 4

    modules: dict[str, tuple[nn.Module, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("fp32", "fp16"):
            modules[f"mec-{dtype}"] = mec_serving(tables, args, dtype, Path(tmp))
    for dtype in QUANT:
        modules[f"qebc-{dtype}"] = quantized_ebc(tables, dtype)
    variants = {name: script_model(m) if args.script else m for name, (m, _) in modules.items()}

    compressed = len(compression_for(tables, args.subspaces, args.codebook_size))
    print(f"{len(tables)} tables, {rows:,} rows, D={args.dim}, {compressed} compressed "
          f"(L={args.subspaces}, K={args.codebook_size}); fp32 tables {fp32_bytes / 2**20:.1f} MiB")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {args.threads} thread(s), "
          f"{'TorchScript' if args.script else 'eager'}, {args.clock} clock, "
          f"load {os.getloadavg()[0]:.1f}")
    int2_bytes = modules["qebc-int2"][1]
    print("\n| variant | bytes (MiB) | vs fp32 | int2 / variant |")
    print("|---|---|---|---|")
    for name, (_, stored) in modules.items():
        print(f"| {name} | {stored / 2**20:.2f} | {fp32_bytes / stored:.1f}x smaller | "
              f"{int2_bytes / stored:.2f}x |")

    print("\n| batch | variant | p50 ms | p99 ms | p99 / qebc-int8 p99 |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for batch in args.batch:
        batches = [zipf_batch(tables, batch, torch.device("cpu"), g)
                   for _ in range(args.requests + args.warmup)]
        times = measure(variants, batches, args.warmup, CLOCKS[args.clock])
        base = percentile(times["qebc-int8"], 0.99)
        for name, samples in times.items():
            p50, p99 = statistics.median(samples), percentile(samples, 0.99)
            print(f"| {batch} | {name} | {p50 * 1e3:.3f} | {p99 * 1e3:.3f} | {p99 / base:.2f}x |")


if __name__ == "__main__":
    main()
