"""Quantizer benchmark: MEC vs plain k-means PQ on clustered synthetic tables with Zipf counts.

Prints, from one run: reconstruction MSE and usage perplexity of MEC (with and without PWR, with
and without the final polish) as ratios to PQQuantizer at the same (L, K); head/tail error with
PWR vs without it (rows drawn in proportion to their counts, and uniformly); fit and encode
rows/s for N = 1e4 .. 1e7 (D = 64, L = 4 and 8, K = 256).

    .venv/bin/python tools/bench/quantizer.py [--quick] [--max-rows N] [--json out.json]
        [--model out/demo]   # also on the tables a DLRM job pretrained (its train-split counts)

"traffic" is the MSE with each row weighted by its count: the error the model's requests see.
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # mec_torchrec, apps
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


def traffic_mse(table, weight: torch.Tensor, counts: torch.Tensor) -> float:
    """Reconstruction MSE with each row weighted by its count: the error requests see."""
    err = (table.decode() - weight).square().mean(1).double()
    c = counts.double().clamp_min(0)
    return float((err * c).sum() / c.sum().clamp_min(1))


def quality_of(
    weight: torch.Tensor, counts: torch.Tensor, num_subspaces: int, k: int, epochs: int, seed: int
) -> dict:
    """PQ and the MEC variants on one table: MSE (plain and count-weighted), head/tail, usage."""
    pq = PQQuantizer(num_subspaces, k, seed=seed).fit(weight, counts)
    out = {"pq": summary(pq.stats) | {"traffic_mse": traffic_mse(pq, weight, counts)}}
    variants = (
        ("mec", {}),
        ("mec_no_polish", {"polish_iters": 0}),
        ("mec_no_pwr", {"use_pwr": False}),
        ("mec_count", {"use_pwr": False, "no_pwr_sampling": "count"}),
        # The demo's setting: count sampling, polish and refit weighted by the counts too.
        ("mec_traffic", {"use_pwr": False, "no_pwr_sampling": "count", "polish_iters": 3,
                         "final_weighting": "sampling"}),
    )
    for name, kw in variants:
        q = MECQuantizer(
            num_subspaces, k, epochs=epochs, seed=seed, sample_size=weight.shape[0], **kw
        )
        table = q.fit(weight, counts)
        out[name] = summary(table.stats) | {"traffic_mse": traffic_mse(table, weight, counts)}
        out[name]["best_epoch"] = q.history and min(q.history, key=lambda h: h["heldout"])["epoch"]
    return out


def quality(num_rows: int, num_subspaces: int, k: int, epochs: int, seed: int) -> dict:
    weight, counts = make_table(num_rows, 64, seed)
    return quality_of(weight, counts, num_subspaces, k, epochs, seed)


def model_tables(out: str):
    """(name, weight, train-split counts) of the tables a finished DLRM job compressed."""
    from pathlib import Path

    from apps.dlrm import checkpoint
    from apps.dlrm.main import table_key
    from apps.dlrm.spec import load_job_spec
    from mec_torchrec.data import ProcessedDataset

    out_dir = Path(out)
    spec = load_job_spec(out_dir / "spec.json")
    ds = ProcessedDataset(Path(spec.data_dir) if spec.data_dir else out_dir / "data")
    for path in sorted((out_dir / "compress").glob("t_*.safetensors")):
        name = path.stem
        feature = name[len("t_") :]
        weight = torch.empty(ds.num_embeddings[feature], spec.model.embedding_dim)
        checkpoint.load_local(out_dir / "pretrain" / "best", {"model": {table_key(name): weight}})
        yield name, weight, ds.counts(feature)


def print_quality(title: str, num_subspaces: int, k: int, res: dict) -> None:
    pq, mec, nopwr, count = res["pq"], res["mec"], res["mec_no_pwr"], res["mec_count"]
    print(f"\n== quality: {title} L={num_subspaces} K={k} ==")
    print(
        f"{'method':<14}{'mse':>10}{'traffic':>10}{'head':>10}{'tail':>10}{'ppl mean':>10}"
        f"{'ppl min':>9}{'dead':>6}{'fit s':>8}{'best ep':>8}"
    )
    for name, r in res.items():
        print(
            f"{name:<14}{r['mse']:>10.4g}{r['traffic_mse']:>10.4g}{r['head_mse']:>10.4g}"
            f"{r['tail_mse']:>10.4g}{r['ppl_mean']:>10.1f}{r['ppl_min']:>9.1f}{r['dead']:>6}"
            f"{r['fit_s']:>8.1f}{r.get('best_epoch', '-'):>8}"
        )
    print(
        f"MEC/PQ mse ratio {mec['mse'] / pq['mse']:.4f} (target <= 1)   "
        f"MEC/PQ perplexity ratio {mec['ppl_mean'] / pq['ppl_mean']:.4f}   "
        f"MEC min perplexity / K {mec['ppl_min'] / k:.3f} (target >= 0.8; "
        f"PQ's {pq['ppl_min'] / k:.3f})"
    )
    print("traffic (count-weighted) mse / PQ's: " + "   ".join(
        f"{name} {r['traffic_mse'] / pq['traffic_mse']:.4f}" for name, r in res.items()
        if name != "pq"))
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
    ap.add_argument(
        "--model",
        default=None,
        help="a finished apps.dlrm.main output folder: also compare on its pretrained tables",
    )
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
            print_quality(f"N={quality_rows:,} D=64", num_subspaces, k, res)
    if args.model:
        for name, weight, counts in model_tables(args.model):
            for num_subspaces in args.subspaces:
                res = quality_of(weight, counts, num_subspaces, k, epochs, args.seed)
                results["quality"][f"{name}_L{num_subspaces}"] = res
                title = f"{args.model} {name} N={weight.shape[0]:,} D={weight.shape[1]}"
                print_quality(title, num_subspaces, k, res)
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
