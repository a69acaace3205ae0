"""Lookup benchmark: torchrec EBC vs FBGEMM fused TBE vs MEC, on Criteo-Kaggle-shaped tables.

For each dim: 26 tables with the Criteo Kaggle cardinalities times ``--scale``, one Zipf id per
feature per sample (id 0 the most frequent, as mec_torchrec.data orders ids), batch ``--batch``.
Variants, each timed for forward and for forward + backward + optimizer step:

  ebc        torchrec EmbeddingBagCollection (nn.EmbeddingBag, dense grads, torch SGD)
  tbe        FBGEMM SplitTableBatchedEmbeddingBagsCodegen, CPU/DEVICE, EXACT_ROWWISE_ADAGRAD fused
             into the backward: what the TorchRec planner uses for these tables
  mec-L*     MECEmbeddingBagCollection, default kernel (on CPU: the fused code-gather +
             pooled lookup of mec_torchrec/modules/fused.py; torch Adagrad, fused=True)
  mec-L*-remap  the same module with kernel="tbe": remap to L-fold code ids, then one dense
             TBE call over codebooks and small tables (the CUDA path; CPU default before)
  mec-L*-fused  the same remap, codebooks in a fused EXACT_ROWWISE_ADAGRAD TBE instead

A table is compressed when its codes + codebooks take fewer bytes than the full table.
Resident bytes = weights + codes + optimizer state. Ratios are against ``tbe`` from this run.

    python tools/bench/lookup.py --scale 0.1 --dim 64 128 --batch 4096 [--quick] [--device cuda]

On CPU, run it with ``MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000`` (or
jemalloc/tcmalloc): otherwise glibc hands every pooled output over 32 MiB back to the OS and
page-faults it in again on the next call: a 16-feature D = 128 lookup then takes 16 ms instead
of 1.8 ms, for the TBE and MEC alike, which says nothing about the kernels.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import time
from collections.abc import Callable

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from mec_torchrec.modules import MECEmbeddingBagCollection, MECTableConfig
from mec_torchrec.modules import fused as mec_fused

CRITEO_KAGGLE = [
    1460,
    583,
    10131227,
    2202608,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    8351593,
    3194,
    27,
    14992,
    5461306,
    10,
    5652,
    2173,
    4,
    7046547,
    18,
    15,
    286181,
    105,
    142572,
]


def criteo_tables(scale: float, dim: int) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            name=f"t_C{i + 1}",
            embedding_dim=dim,
            num_embeddings=max(1, int(n * scale)),
            feature_names=[f"C{i + 1}"],
        )
        for i, n in enumerate(CRITEO_KAGGLE)
    ]


def zipf_batch(
    tables: list[EmbeddingBagConfig],
    batch: int,
    device: torch.device,
    generator: torch.Generator,
    ids_per_bag: int = 1,
) -> KeyedJaggedTensor:
    """Zipf ids, P(id = k) ~ 1 / (k + 1) (log-uniform inverse CDF): one per feature per sample,
    or with ``ids_per_bag`` k > 1 bags of 1 to 2k - 1 ids (k on average; multi-hot features)."""
    values, lengths = [], []
    for t in tables:
        if ids_per_bag == 1:
            bag = torch.ones(batch, dtype=torch.int64)
        else:
            bag = torch.randint(1, 2 * ids_per_bag, (batch,), generator=generator)
        u = torch.rand(int(bag.sum()), generator=generator, dtype=torch.float64)
        ids = torch.exp(u * math.log(t.num_embeddings + 1)).floor().long() - 1
        values.append(ids.clamp_(0, t.num_embeddings - 1))
        lengths.append(bag)
    return KeyedJaggedTensor(
        keys=[t.feature_names[0] for t in tables],
        values=torch.cat(values),
        lengths=torch.cat(lengths),
    ).to(device)


def compression_for(
    tables: list[EmbeddingBagConfig], subspaces: int, codebook_size: int
) -> dict[str, MECTableConfig]:
    out = {}
    for t in tables:
        stored = t.num_embeddings * subspaces + codebook_size * t.embedding_dim * 4
        if stored < t.num_embeddings * t.embedding_dim * 4:
            out[t.name] = MECTableConfig(subspaces, codebook_size)
    return out


def fused_tbe(
    shapes: list[tuple[int, int]], feature_tables: list[int], device: torch.device
) -> SplitTableBatchedEmbeddingBagsCodegen:
    on_cpu = device.type == "cpu"
    location = EmbeddingLocation.HOST if on_cpu else EmbeddingLocation.DEVICE
    compute = ComputeDevice.CPU if on_cpu else ComputeDevice.CUDA
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, location, compute) for rows, dim in shapes],
        feature_table_map=feature_tables,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.01,
        weights_precision=SparseType.FP32,
        device=device,
    )


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def timed(fn: Callable[[int], object], iters: int, device: torch.device) -> float:
    """Best (minimum) seconds per call of fn(i) after 3 warm-up calls.

    The minimum, not the median: on a shared host other processes only ever add time.
    """
    for i in range(3):
        fn(i)
    return min(_once(fn, i, device) for i in range(iters))


#: Clock of the timings: wall time, or this process's CPU time (``--clock cpu``: with one torch
#: thread on a CPU shared with other jobs, CPU time is what the step costs, free of waits).
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter
dense_loss = False
_grads: dict[tuple, torch.Tensor] = {}


def backprop(out: torch.Tensor) -> None:
    """``out.sum().backward()`` (a broadcast gradient), or with ``--loss dense`` a fixed random
    dense gradient of ``out``'s shape, as a real model's loss gives."""
    if not dense_loss:
        out.sum().backward()
        return
    key = (tuple(out.shape), out.device)
    if key not in _grads:
        _grads[key] = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(
            out.device
        )
    out.backward(_grads[key])


def _once(fn: Callable[[int], object], i: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


class Recorder:
    """Collects the variants of one dim, then times them round-robin.

    Interleaving (one forward and one training step of every variant per round, best of
    ``iters`` rounds) spreads the noise of a shared host evenly over the variants.
    """

    def __init__(self, dim: int, iters: int, device: torch.device) -> None:
        self.dim, self.iters, self.device = dim, iters, device
        self.variants: list[tuple[str, Callable, Callable, int, str]] = []

    def add(
        self,
        name: str,
        forward: Callable[[int], object],
        step: Callable[[int], object],
        resident: int,
        note: str = "",
    ) -> None:
        self.variants.append((name, forward, step, resident, note))

    def run(self) -> list[dict]:
        best = {name: [math.inf, math.inf] for name, *_ in self.variants}
        for name, forward, step, *_ in self.variants:  # warm up
            with torch.no_grad():
                forward(0)
            step(0)
        for i in range(self.iters):
            for name, forward, step, *_ in self.variants:
                with torch.no_grad():
                    best[name][0] = min(best[name][0], _once(forward, i, self.device))
                best[name][1] = min(best[name][1], _once(step, i, self.device))
        rows = []
        for name, _, _, resident, note in self.variants:
            fwd, train = best[name]
            rows.append(
                {"dim": self.dim, "variant": name, "fwd": fwd, "train": train, "bytes": resident}
            )
            print(
                f"  D={self.dim} {name:14s} fwd {fwd * 1e3:8.2f} ms  train "
                f"{train * 1e3:8.2f} ms  {resident / 2**20:9.1f} MiB {note}",
                flush=True,
            )
        return rows


def bench_ebc(
    record: Recorder, tables: list[EmbeddingBagConfig], batches: list[KeyedJaggedTensor]
) -> None:
    ebc = EmbeddingBagCollection(tables=tables, device=record.device)
    sgd = torch.optim.SGD(ebc.parameters(), lr=0.01)

    def step(i: int) -> None:
        sgd.zero_grad(set_to_none=False)
        backprop(ebc(batches[i % 4]).values())
        sgd.step()

    step(0)  # materialise the dense grads: they stay resident during training
    record.add("ebc", lambda i: ebc(batches[i % 4]), step, tensor_bytes(ebc.parameters()) * 2)


def tbe_bytes(tbe: SplitTableBatchedEmbeddingBagsCodegen) -> int:
    """Weights + rowwise Adagrad state, wherever the TBE keeps them."""
    on_host = tbe.weights_host.numel() > 0
    return tensor_bytes(
        [
            tbe.weights_host if on_host else tbe.weights_dev,
            tbe.momentum1_host if on_host else tbe.momentum1_dev,
        ]
    )


def bench_tbe(
    record: Recorder, tables: list[EmbeddingBagConfig], batches: list[KeyedJaggedTensor]
) -> None:
    tbe = fused_tbe(
        [(t.num_embeddings, t.embedding_dim) for t in tables],
        list(range(len(tables))),
        record.device,
    )
    flat = [(b.values(), b.offsets()) for b in batches]
    record.add(
        "tbe", lambda i: tbe(*flat[i % 4]), lambda i: backprop(tbe(*flat[i % 4])), tbe_bytes(tbe)
    )


def bench_mec(
    record: Recorder,
    tables: list[EmbeddingBagConfig],
    batches: list[KeyedJaggedTensor],
    subspaces: int,
    codebook_size: int,
) -> None:
    for kernel, suffix in (("auto", ""), ("tbe", "-remap")):
        mec = MECEmbeddingBagCollection(
            tables,
            compression_for(tables, subspaces, codebook_size),
            device=record.device,
            kernel=kernel,
        )
        adagrad = torch.optim.Adagrad(mec.parameters(), lr=0.01, fused=True)

        def step(i: int, mec=mec, adagrad=adagrad) -> None:
            adagrad.zero_grad()
            backprop(mec(batches[i % 4]).values())
            adagrad.step()

        model_bytes = sum(b.stored for b in mec.embedding_bytes().values())
        if kernel == "tbe":
            note = mec_breakdown(mec, batches, record.iters, record.device)
        elif mec.uses_fused_kernel():
            step(0)  # the optimizer's state and the gradients exist from here on
            note = fused_breakdown(mec, batches, adagrad, record.iters, record.device)
        else:
            note = ""
        record.add(
            f"mec-L{subspaces}{suffix}",
            lambda i, mec=mec: mec(batches[i % 4]),
            step,
            model_bytes + tensor_bytes(mec.parameters()),
            note,
        )

    # The same remap feeding the codebooks to a fused rowwise-Adagrad TBE instead.
    layout = mec._layout
    fused = fused_tbe(
        [(t.num_embeddings, t.embedding_dim) for t in layout.inner_tables],
        layout.lookup_tables,
        record.device,
    )

    def fused_forward(i: int) -> torch.Tensor:
        values, lengths, _ = mec._remap_tensors(batches[i % 4])
        return fused(values, torch.ops.fbgemm.asynchronous_complete_cumsum(lengths))

    codes_bytes = tensor_bytes([getattr(mec.codes, n) for n in layout.compressed])
    record.add(
        f"mec-L{subspaces}-fused",
        fused_forward,
        lambda i: backprop(fused_forward(i)),
        codes_bytes + tbe_bytes(fused),
    )


def bench_dim(args: argparse.Namespace, dim: int, device: torch.device) -> list[dict]:
    tables = criteo_tables(args.scale, dim)
    g = torch.Generator().manual_seed(0)
    batches = [zipf_batch(tables, args.batch, device, g) for _ in range(4)]
    record = Recorder(dim, 5 if args.quick else args.iters, device)
    if not args.skip_ebc:
        bench_ebc(record, tables, batches)
    bench_tbe(record, tables, batches)
    for subspaces in args.subspaces:
        if dim % subspaces == 0:
            bench_mec(record, tables, batches, subspaces, args.codebook_size)
    rows = record.run()
    gc.collect()
    return rows


def mec_breakdown(
    mec: MECEmbeddingBagCollection,
    batches: list[KeyedJaggedTensor],
    iters: int,
    device: torch.device,
) -> str:
    """Forward split into remap (ids -> code ids) and the one-call pooled lookup."""
    remapped = [mec._remap_tensors(b) for b in batches]
    offsets = [torch.ops.fbgemm.asynchronous_complete_cumsum(r[1]) for r in remapped]
    with torch.no_grad():
        remap = timed(lambda i: mec._remap_tensors(batches[i % 4]), iters, device)
        lookup = timed(
            lambda i: mec._lookup(
                mec._inner_weights(), remapped[i % 4][0], offsets[i % 4], remapped[i % 4][1], None
            ),
            iters,
            device,
        )
        pooled = mec.codebooks(mec.remap(batches[0])).to_dict()
        regroup = timed(lambda i: mec.regroup(pooled), iters, device)
    return (
        f"[remap {remap * 1e3:.2f} ms, lookup {lookup * 1e3:.2f} ms; "
        f"regroup(dict), sharded path only: {regroup * 1e3:.2f} ms]"
    )


def fused_breakdown(
    mec: MECEmbeddingBagCollection,
    batches: list[KeyedJaggedTensor],
    optimizer: torch.optim.Optimizer,
    iters: int,
    device: torch.device,
) -> str:
    """Training step of the fused CPU kernel in parts, each timed alone (warm caches): KJT
    checks (layout, lengths, id bounds), the kernel's forward, its backward (dense output
    gradient, codebook gradients out) and the optimizer step. The rest of a step is autograd
    and Python glue."""
    ext = mec_fused.extension()
    plan = mec._fused_plan
    checked = [mec._checked_tensors(b) for b in batches]
    offsets = [torch.ops.fbgemm.asynchronous_complete_cumsum(c[1]) for c in checked]
    codes = [getattr(mec.codes, n) for n in mec._layout.compressed]
    weights = [w.detach() for w in mec._inner_weights()]
    batch, total_dim = batches[0].stride(), plan[9]
    grad = torch.randn(batch, total_dim, generator=torch.Generator().manual_seed(0))

    def kernel_forward(i: int) -> torch.Tensor:
        ids, _, _, _, _ = checked[i % 4]
        return ext.forward(ids, offsets[i % 4], None, weights, codes, batch, total_dim, *plan[:6])

    def kernel_backward(i: int) -> list[torch.Tensor]:
        ids, _, _, _, _ = checked[i % 4]
        return ext.backward(
            grad, ids, offsets[i % 4], None, weights, codes, batch, *plan[:9], False
        )

    check = timed(lambda i: mec._checked_tensors(batches[i % 4]), iters, device)
    forward = timed(kernel_forward, iters, device)
    backward = timed(kernel_backward, iters, device)
    step = timed(lambda i: optimizer.step(), iters, device)
    return (
        f"[checks {check * 1e3:.2f} ms, kernel fwd {forward * 1e3:.2f} ms, "
        f"kernel bwd {backward * 1e3:.2f} ms, optimizer {step * 1e3:.2f} ms]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.1, help="cardinality multiplier")
    parser.add_argument("--dim", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--subspaces", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="5 timed iterations")
    parser.add_argument("--skip-ebc", action="store_true", help="skip the slow torchrec EBC")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCK),
        default="wall",
        help="wall time, or process CPU time (for --threads 1 on a busy CPU host)",
    )
    parser.add_argument(
        "--loss",
        choices=["sum", "dense"],
        default="sum",
        help="train step gradient: out.sum() (broadcast) or a dense random one",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    global clock, dense_loss
    dense_loss = args.loss == "dense"
    clock = CLOCK[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows_total = sum(t.num_embeddings for t in criteo_tables(args.scale, 1))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(
        f"lookup bench: {where}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}, "
        f"scale {args.scale} ({rows_total:,} rows), batch {args.batch}, "
        f"K {args.codebook_size}, {args.clock} clock, {args.loss} loss",
        flush=True,
    )
    rows = []
    for dim in args.dim:
        rows += bench_dim(args, dim, device)
    print(
        "\n| D | variant | fwd samples/s | train samples/s | fwd / tbe | train / tbe | "
        "resident MiB | memory vs tbe |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["dim"] == r["dim"] and b["variant"] == "tbe")
        print(
            f"| {r['dim']} | {r['variant']} | {args.batch / r['fwd']:,.0f} | "
            f"{args.batch / r['train']:,.0f} | {base['fwd'] / r['fwd']:.2f}x | "
            f"{base['train'] / r['train']:.2f}x | {r['bytes'] / 2**20:,.1f} | "
            f"{base['bytes'] / r['bytes']:.1f}x smaller |"
        )


if __name__ == "__main__":
    main()
