"""``report.json``, the printed summary table and the PNG plots, built from the stage results.

Every figure here is read from ``DIR/<stage>/result.json``; nothing is computed twice or assumed.
Bytes are what the tables store: a full table N * D * 4; a compressed one its codes (N * L at
the code dtype) plus its codebooks (L * K * D/L * 4). ``compression_ratio`` covers every
embedding table (small uncompressed ones included); ``compression_ratio_compressed_tables`` only
the tables that were quantized.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mec_torchrec.io import atomic_path, atomic_write_text

PLOTS = ("eval_curves.png", "table_bytes.png", "code_usage.png")


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _metrics(stage: dict, bytes_: int) -> dict[str, Any]:
    test = stage["test"]
    return {
        "auc": test["auc"],
        "logloss": test["logloss"],
        "ne": test["ne"],
        "embedding_bytes": bytes_,
        "valid_auc": stage["valid"]["auc"],
        "valid_logloss": stage["valid"]["logloss"],
        "best_step": stage.get("best_step"),
        "best_epoch": stage["valid"].get("epoch", 0.0),
    }


def build(out: Path) -> dict[str, Any]:
    """Assemble the report from whichever stages have finished."""
    pre, comp, train = (_read(out / s / "result.json") for s in ("pretrain", "compress", "train"))
    rep: dict[str, Any] = {"seconds": {}}
    for name, stage in (("pretrain", pre), ("compress", comp), ("train", train)):
        if stage is not None:
            rep["seconds"][name] = round(stage["seconds"], 1)
    if pre is not None:
        rep["baseline"] = _metrics(pre, pre["embedding_bytes"])
        rep["baseline"]["samples_per_second"] = pre["samples_per_second"]
    if comp is None:
        return rep
    tables = {
        n: {
            k: t[k]
            for k in (
                "rows",
                "dim",
                "num_subspaces",
                "codebook_size",
                "full_bytes",
                "bytes",
                "ratio",
            )
        }
        for n, t in comp["tables"].items()
    }
    full_small = sum(t["bytes"] for t in comp["uncompressed"].values())
    mec_bytes = sum(t["bytes"] for t in tables.values()) + full_small
    full_bytes = sum(t["full_bytes"] for t in tables.values()) + full_small
    rep["compression_ratio"] = full_bytes / mec_bytes
    compressed = sum(t["bytes"] for t in tables.values())
    rep["compression_ratio_compressed_tables"] = (
        sum(t["full_bytes"] for t in tables.values()) / compressed if compressed else 1.0
    )
    rep["mec"] = {"embedding_bytes": mec_bytes, "tables": tables}
    rep["uncompressed_tables"] = comp["uncompressed"]
    if train is None:
        return rep
    variants = train["variants"]
    first = next(iter(variants))
    rep["mec"] = {**_metrics(variants[first], mec_bytes), "variant": first, "tables": tables}
    rep["mec"]["samples_per_second"] = variants[first]["samples_per_second"]
    rep["mec_variants"] = {v: _metrics(r, mec_bytes) for v, r in variants.items()}
    if train.get("no_retrain"):
        rep["mec_no_retrain"] = _metrics(train["no_retrain"], mec_bytes)
    return rep


def write(out: Path) -> dict[str, Any]:
    rep = build(out)
    atomic_write_text(out / "report.json", json.dumps(rep, indent=1))
    plot(out)
    return rep


def table(rep: dict[str, Any]) -> str:
    """The summary the demo prints: baseline vs MEC (and its variants) side by side.

    "best at" is where in its own stage the kept state was found (epochs of that stage's data).
    """
    rows = [("model", "test AUC", "test logloss", "emb. bytes", "ratio", "best at")]
    ratio = rep.get("compression_ratio")
    models = [("baseline (full tables)", rep.get("baseline"), 1.0)]
    models.append(("MEC, no retraining", rep.get("mec_no_retrain"), ratio))
    for variant, m in rep.get("mec_variants", {}).items():
        models.append((f"MEC, retrained ({variant})", m, ratio))
    for name, m, r in models:
        if m:
            at = "-" if m is rep.get("mec_no_retrain") else f"{m['best_epoch']:.2f} ep"
            rows.append((name, f"{m['auc']:.4f}", f"{m['logloss']:.4f}",
                         f"{m['embedding_bytes']:,}", f"{r:.1f}x", at))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    if ratio is not None:
        lines.append(
            f"compression ratio: {ratio:.1f}x over all tables, "
            f"{rep['compression_ratio_compressed_tables']:.1f}x over the "
            f"{len(rep['mec']['tables'])} compressed tables (codes counted)"
        )
    base = rep.get("baseline")
    if base and rep.get("mec", {}).get("auc") is not None:
        lines.append(f"MEC - baseline test AUC: {rep['mec']['auc'] - base['auc']:+.4f}")
    if rep["seconds"]:
        lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in rep["seconds"].items()))
    return "\n".join(lines)


def plot(out: Path) -> None:
    """Write the PNG plots for the stages that have results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre, comp, train = (_read(out / s / "result.json") for s in ("pretrain", "compress", "train"))
    curves = {}
    if pre:
        curves["baseline"] = pre["history"]
    for v, r in ((train or {}).get("variants") or {}).items():
        curves[f"MEC {v}"] = r["history"]
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for (name, hist), style in zip(curves.items(), ("o-", "s-", "^-", "v-")):
            x = [h["epoch"] for h in hist]
            axes[0].plot(x, [h["auc"] for h in hist], style, label=name, markersize=3)
            axes[1].plot(x, [h["logloss"] for h in hist], style, label=name, markersize=3)
        for ax, what in zip(axes, ("valid AUC", "valid logloss")):
            ax.set_xlabel("epochs of its stage")
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle("Validation during training (MEC epochs count stage 3 only)")
        _save(fig, out / PLOTS[0])
    if comp:
        names = list(comp["tables"]) + list(comp["uncompressed"])
        full = [comp["tables"].get(n, comp["uncompressed"].get(n))["full_bytes"] for n in names]
        mec = [comp["tables"].get(n, comp["uncompressed"].get(n))["bytes"] for n in names]
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], full, 0.4, label="full (fp32)")
        ax.bar([x + 0.2 for x in xs], mec, 0.4, label="MEC (codes + codebooks)")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), names, rotation=90, fontsize=7)
        ax.set_ylabel("bytes")
        ax.legend()
        ax.set_title("Embedding bytes per table")
        _save(fig, out / PLOTS[1])
        _plot_usage(plt, comp["tables"], out / PLOTS[2])


def _plot_usage(plt: Any, tables: dict[str, Any], path: Path) -> None:
    if not tables:
        return
    cols = min(4, len(tables))
    rows = math.ceil(len(tables) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.5 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, t) in zip(axes.flat, tables.items()):
        for i, usage in enumerate(t["usage"]):
            ax.hist(usage, bins=30, histtype="step", label=f"subspace {i}")
        perp = ", ".join(f"{p:.0f}" for p in t["perplexity"])
        ax.set_title(f"{name}: perplexity {perp} / {t['codebook_size']}", fontsize=8)
        ax.set_xlabel("rows per code", fontsize=7)
        ax.set_ylabel("codes", fontsize=7)
    for ax in list(axes.flat)[len(tables) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("Code usage per subspace")
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m apps.dlrm.report DIR``: print the summary table of a finished (or partial) run."""
    import argparse

    parser = argparse.ArgumentParser(prog="apps.dlrm.report", description=main.__doc__)
    parser.add_argument("out", type=Path, help="the run's output folder (holds report.json)")
    args = parser.parse_args(argv)
    print(table(build(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
