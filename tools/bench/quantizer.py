"""Quantizer benchmark: MEC vs plain k-means PQ on clustered synthetic tables with Zipf counts.

Prints, from one run: reconstruction MSE and usage perplexity of MEC (with and without PWR, with
and without the final polish) as ratios to PQQuantizer at the same (L, K); head/tail error with
PWR vs without it (rows drawn in proportion to their counts, and uniformly); fit and encode
rows/s for N = 1e4 .. 1e7 (D = 64, L = 4 and 8, K = 256).

    .venv/bin/python tools/bench/quantizer.py [--quick] [--max-rows N] [--json out.json]
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from mec_torchrec.quantize import MECQuantizer, PQQuantizer


def make_table(
    num_rows: int, dim: int, seed: int, clusters: int = 4096, noise: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered rows (Zipf-sized clusters + Gaussian noise) and Zipf counts (id 0 most frequent).

    Returns weight float32 [N, D] and counts int64 [N] with counts[j] = floor(10 N / (j+1)^1.1).
    """
    g = torch.Generator().manual_seed(seed)
    clusters = min(clusters, num_rows)
    centres = torch.randn(clusters, dim, generator=g)
    size_w = 1.0 / torch.arange(1, clusters + 1, dtype=torch.float64) ** 0.8
    weight = torch.empty(num_rows, dim)
    for start in range(0, num_rows, 1 << 20):
        n = min(1 << 20, num_rows - start)
        which = torch.multinomial(size_w, n, replacement=True, generator=g)
        weight[start : start + n] = centres[which] + noise * torch.randn(n, dim, generator=g)
    counts = (10.0 * num_rows / torch.arange(1, num_rows + 1, dtype=torch.float64) ** 1.1).long()
    return weight, counts


def summary(table_stats: dict) -> dict:
    b = table_stats["buckets"]
    ppl = table_stats["perplexity"]
    return {
        "mse": table_stats["mse"],
        "head_mse": b["head"]["mse"],
        "tail_mse": b["tail"]["mse"],
        "ppl_mean": sum(ppl) / len(ppl),
        "ppl_min": min(ppl),
        "dead": sum(table_stats["dead_codes"]),
        "fit_s": table_stats["fit_seconds"],
        "encode_s": table_stats["encode_seconds"],
    }


def quality(num_rows: int, num_subspaces: int, k: int, epochs: int, seed: int) -> dict:
    weight, counts = make_table(num_rows, 64, seed)
    out = {"pq": summary(PQQuantizer(num_subspaces, k, seed=seed).fit(weight, counts).stats)}
    variants = (
        ("mec", {}),
        ("mec_no_polish", {"polish_iters": 0}),
        ("mec_no_pwr", {"use_pwr": False}),
        ("mec_count", {"use_pwr": False, "no_pwr_sampling": "count"}),
    )
    for name, kw in variants:
        q = MECQuantizer(num_subspaces, k, epochs=epochs, seed=seed, sample_size=num_rows, **kw)
        out[name] = summary(q.fit(weight, counts).stats)
        out[name]["best_epoch"] = q.history and min(q.history, key=lambda h: h["heldout"])["epoch"]
    return out


def print_quality(num_rows: int, num_subspaces: int, k: int, res: dict) -> None:
    pq, mec, nopwr, count = res["pq"], res["mec"], res["mec_no_pwr"], res["mec_count"]
    print(f"\n== quality: N={num_rows:,} D=64 L={num_subspaces} K={k} ==")
    print(
        f"{'method':<12}{'mse':>9}{'head':>9}{'tail':>9}{'ppl mean':>10}{'ppl min':>9}"
        f"{'dead':>6}{'fit s':>8}{'best ep':>8}"
    )
    for name, r in res.items():
        print(
            f"{name:<12}{r['mse']:>9.4f}{r['head_mse']:>9.4f}{r['tail_mse']:>9.4f}"
            f"{r['ppl_mean']:>10.1f}{r['ppl_min']:>9.1f}{r['dead']:>6}{r['fit_s']:>8.1f}"
            f"{r.get('best_epoch', '-'):>8}"
        )
    print(
        f"MEC/PQ mse ratio {mec['mse'] / pq['mse']:.4f} (target <= 1)   "
        f"MEC/PQ perplexity ratio {mec['ppl_mean'] / pq['ppl_mean']:.4f}   "
        f"MEC min perplexity / K {mec['ppl_min'] / k:.3f} (target >= 0.8)"
    )
    for label, base in (("count-proportional", count), ("uniform", nopwr)):
        print(
            f"PWR vs no PWR ({label} sampling): tail mse ratio "
            f"{mec['tail_mse'] / base['tail_mse']:.4f} (target < 1)   "
            f"head mse ratio {mec['head_mse'] / base['head_mse']:.4f}"
        )


def scaling(num_rows: int, num_subspaces: int, k: int, epochs: int, seed: int) -> dict:
    weight, counts = make_table(num_rows, 64, seed)
    sample = min(num_rows, 1_000_000)
    t0 = time.perf_counter()
    q = MECQuantizer(num_subspaces, k, epochs=epochs, sample_size=sample, seed=seed)
    stats = q.fit(weight, counts).stats
    total = time.perf_counter() - t0
    return {
        "rows": num_rows,
        "L": num_subspaces,
        "sample": sample,
        "epochs_run": len(q.history) - 1,
        "fit_s": stats["fit_seconds"],
        "encode_s": stats["encode_seconds"],
        "total_s": total,
        "fit_rows_per_s": sample * (len(q.history) - 1 or 1) / stats["fit_seconds"],
        "encode_rows_per_s": num_rows / stats["encode_seconds"],
        "mse": stats["mse"],
        "ppl_min": min(stats["perplexity"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--max-rows", type=int, default=10_000_000, help="cap of the scaling curve")
    ap.add_argument("--quality-rows", type=int, default=None, help="N of the quality comparison")
    ap.add_argument("--epochs", type=int, default=None, help="MEC epochs (default 10, quick 2)")
    ap.add_argument("--scaling-epochs", type=int, default=2, help="MEC epochs in the scaling runs")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="scaling N values")
    ap.add_argument("--subspaces", type=int, nargs="*", default=[4, 8], help="L values")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write all figures to this file")
    args = ap.parse_args()
    k = 256
    quality_rows = args.quality_rows or (20_000 if args.quick else 200_000)
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 10)
    max_rows = min(args.max_rows, 100_000 if args.quick else args.max_rows)
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU"
    )
    results: dict = {"quality": {}, "scaling": []}
    if not args.skip_quality:
        for num_subspaces in args.subspaces:
            res = quality(quality_rows, num_subspaces, k, epochs, args.seed)
            results["quality"][f"L{num_subspaces}"] = res
            print_quality(quality_rows, num_subspaces, k, res)
    if not args.skip_scaling:
        print(
            f"\n== scaling: D=64 K={k}, fit on min(N, 1M) PWR pool, "
            f"{args.scaling_epochs} epochs, encode all N =="
        )
        print(
            f"{'N':>12}{'L':>3}{'fit s':>9}{'encode s':>10}{'total s':>9}{'fit rows/s':>12}"
            f"{'enc rows/s':>12}{'mse':>8}{'ppl min':>9}"
        )
        sizes = args.sizes or [10**e for e in range(4, 8) if 10**e <= max_rows]
        for num_rows in sizes:
            for num_subspaces in args.subspaces:
                r = scaling(num_rows, num_subspaces, k, args.scaling_epochs, args.seed)
                results["scaling"].append(r)
                print(
                    f"{num_rows:>12,}{num_subspaces:>3}{r['fit_s']:>9.1f}{r['encode_s']:>10.1f}"
                    f"{r['total_s']:>9.1f}{r['fit_rows_per_s']:>12,.0f}"
                    f"{r['encode_rows_per_s']:>12,.0f}{r['mse']:>8.4f}{r['ppl_min']:>9.1f}",
                    flush=True,
                )
                if num_rows >= 10_000_000:
                    status = "met" if r["total_s"] < 300 else "MISSED"
                    print(f"   10M target (< 300 s incl. fit): {status}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
