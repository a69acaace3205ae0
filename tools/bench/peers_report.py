"""The report half of tools/bench/peers.py: summary lines, markdown tables and the AUC-vs-bytes plot.

Pure functions of ``results.json``'s rows (``{"<option>/s<seed>": {"auc", "logloss", "bytes",
"lookup_ms", ...}}``), so a finished run can be re-reported without training anything.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

MAIN = (4, 256)  # full MEC's L, K: the byte budget of hashing and QR

ROWS = [  # (results key without the seed, label)
    ("fp32", "fp32 full tables (upper bound)"),
    ("fp32-retrained", "fp32 + the retraining stage (control)"),
    ("fp16", "fp16 rows (TorchRec PTQ of fp32)"),
    ("int8", "int8 row-wise (TorchRec PTQ)"),
    ("int4", "int4 row-wise (TorchRec PTQ)"),
    ("int2", "int2 row-wise (TorchRec PTQ)"),
    ("hashing", "hashing trick, MEC L4 K256 bytes"),
    ("qr", "quotient-remainder (mult), MEC L4 K256 bytes"),
]


def summarize(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per option: mean, half range and mean paired difference to fp32 of each seed."""
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for key, row in results.items():
        option, seed = key.rsplit("/s", 1)
        groups.setdefault(option, {})[seed] = row
    labels = dict(ROWS)
    kinds = {"mec": "MEC", "pq": "plain PQ", "mec-no-pwr": "MEC without PWR",
             "mec-no-contrastive": "MEC without contrastive",
             "mec-count": "MEC, count sampling + count-weighted refit",
             "mec-exact": "MEC, count sampling + refit + 64 exact rows",
             "mec-fisher": "MEC, + loss metric (the demo's stage 2)"}
    for key in groups:
        if key not in labels:
            method, *rest = key.split("/")
            kind, size = method.split("-L")
            labels[key] = f"{kinds[kind]} L{size.replace('-K', ' K')}" + (
                ", no retrain" if rest else ", retrained")
    rank = {k: i for i, k in enumerate([*dict(ROWS), "mec", "mec-count", "mec-exact",
                                        "mec-fisher", "pq", "mec-no-pwr", "mec-no-contrastive"])}

    def order(key: str) -> tuple:
        method = key.split("/")[0]
        main = method.endswith(f"-L{MAIN[0]}-K{MAIN[1]}") or "-L" not in method
        return (not main, rank[method.split("-L")[0]], next(iter(groups[key].values()))["bytes"],
                "/" in key)

    fp32 = groups["fp32"]
    lines = []
    for key in sorted(groups, key=order):
        rows = groups[key]
        aucs = [r["auc"] for r in rows.values()]
        deltas = [r["auc"] - fp32[seed]["auc"] for seed, r in rows.items() if seed in fp32]
        first = next(iter(rows.values()))
        lines.append({
            "key": key, "label": labels[key], "seeds": len(rows),
            "auc": statistics.mean(aucs),
            "auc_spread": (max(aucs) - min(aucs)) / 2 if len(rows) > 1 else None,
            "delta_fp32": statistics.mean(deltas),
            "logloss": statistics.mean(r["logloss"] for r in rows.values()),
            "bytes": first["bytes"],
            "ratio": statistics.mean(r["bytes"] for r in fp32.values()) / first["bytes"],
            "lookup_ms": statistics.median(r["lookup_ms"] for r in rows.values()),
        })
    return lines


def markdown(lines: list[dict[str, Any]]) -> str:
    """The table: AUC as mean ± half the range over seeds; delta paired with fp32 by seed."""
    out = [("| option | seeds | test AUC | Δ AUC vs fp32 | logloss | embedding bytes | vs fp32 "
           "| lookup ms |"), "|---|---|---|---|---|---|---|---|"]
    for r in lines:
        spread = r["auc_spread"]
        auc = f"{r['auc']:.4f}" + (f" ± {spread:.4f}" if spread is not None else "")
        out.append(f"| {r['label']} | {r['seeds']} | {auc} | {r['delta_fp32']:+.4f} | "
                   f"{r['logloss']:.4f} | {r['bytes']:,} | {r['ratio']:.1f}x | "
                   f"{r['lookup_ms']:.2f} |")
    return "\n".join(out) + "\n"


def goals(results: dict[str, dict[str, Any]], mec: str = f"mec-L{MAIN[0]}-K{MAIN[1]}") -> str:
    """MEC ``mec`` (retrained) against each rival: AUC difference paired by seed, and bytes."""
    out = [f"| {mec} vs | seeds | Δ AUC (mean) | per seed | bytes: rival / MEC |",
           "|---|---|---|---|---|"]
    main = f"mec-L{MAIN[0]}-K{MAIN[1]}"
    for rival in ("fp32", "fp32-retrained", "int4", "int2", "hashing", "qr",
                  f"pq-L{MAIN[0]}-K{MAIN[1]}", f"mec-no-pwr-L{MAIN[0]}-K{MAIN[1]}",
                  f"mec-no-contrastive-L{MAIN[0]}-K{MAIN[1]}", main, f"{mec}/no-retrain"):
        if rival == mec:
            continue
        pairs = [(results[k], results[f"{rival}/s{k.rsplit('/s', 1)[1]}"]) for k in results
                 if k.startswith(f"{mec}/s") and f"{rival}/s{k.rsplit('/s', 1)[1]}" in results]
        if pairs:
            d = [m["auc"] - r["auc"] for m, r in pairs]
            out.append(f"| {rival} | {len(d)} | {statistics.mean(d):+.4f} | "
                       f"{', '.join(f'{x:+.4f}' for x in d)} | "
                       f"{pairs[0][1]['bytes'] / pairs[0][0]['bytes']:.2f}x |")
    return "\n".join(out) + "\n"


def plot(results: dict[str, dict[str, Any]], seed: int, path: Path) -> None:
    """Test AUC vs bytes as stored (log x) of one seed: every point shares one pretrained model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {k.rsplit("/s", 1)[0]: {**r, "key": k.rsplit("/s", 1)[0]}
              for k, r in results.items() if k.endswith(f"/s{seed}")}
    fig, ax = plt.subplots(figsize=(9, 5.5))

    def series(keys: list[str], style: str, label: str, names: bool = False) -> None:
        rows = sorted((by_key[k] for k in keys if k in by_key), key=lambda r: r["bytes"])
        ax.plot([r["bytes"] for r in rows], [r["auc"] for r in rows], style, label=label)
        for r in rows if names else ():
            ax.annotate(r["key"].split("/")[0].replace("mec-", "").replace("-", " "),
                        (r["bytes"], r["auc"]), fontsize=7, xytext=(4, -10),
                        textcoords="offset points")

    curve = [k for k in by_key if k.startswith("mec-L") and "/" not in k]
    series(curve, "o-", "MEC retrained (L, K)", names=True)
    series([f"{k}/no-retrain" for k in curve], "o--", "MEC no retrain")
    series(["fp32", "fp16", "int8", "int4", "int2"], "s:",
           "fp32, then TorchRec PTQ fp16/int8/int4/int2")
    for key in ("fp32", "int4", "int2"):
        r = by_key[key]
        ax.annotate(key, (r["bytes"], r["auc"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    series(["fp32-retrained"], "s", "fp32 + retraining stage (control)")
    series(["hashing"], "D", "hashing trick (same bytes as MEC L4 K256)")
    series(["qr"], "D", "quotient-remainder (same bytes)")
    series([f"pq-L{MAIN[0]}-K{MAIN[1]}"], "x", "plain PQ L4 K256, retrained")
    series([f"mec-no-pwr-L{MAIN[0]}-K{MAIN[1]}"], "+", "MEC without PWR, retrained")
    series([f"mec-count-L{MAIN[0]}-K{MAIN[1]}"], "*", "MEC, count sampling + weighted refit, retrained")
    series([f"mec-fisher-L{MAIN[0]}-K{MAIN[1]}"], "P",
           "MEC, + 64 exact rows + loss metric (demo), retrained")
    ax.set_xscale("log")
    ax.set_xlabel("embedding bytes as stored (log)")
    ax.set_ylabel(f"test AUC (seed {seed})")
    ax.set_title(f"DLRM on the built-in data, seed {seed}: test AUC vs embedding memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
