"""``mec data``: ``synth`` (the built-in data), ``prepare`` and ``inspect`` (any dataset spec)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mec_torchrec.data.dataset import ProcessedDataset
from mec_torchrec.data.prepare import prepare_dataset
from mec_torchrec.data.spec import load_dataset_spec


def _synth(args: argparse.Namespace) -> int:
    from mec_torchrec.data.synth import synthesize

    s = synthesize(args.out, rows=args.rows, scale=args.scale, seed=args.seed,
                   multi_valued=args.multi_valued, progress=not args.quiet)
    print(f"wrote {sum(s.rows.values()):,} rows {s.rows} to {s.out} in {s.seconds:.1f} s "
          f"(spec: {Path(s.out) / 'dataset.yaml'})")
    print(f"positive rate {s.positive_rate:.3f}; largest table "
          f"{max(s.cardinalities.values()):,} ids; {len(s.cardinalities)} categorical features")
    _print_aucs(s.__dict__)
    return 0


def _print_aucs(summary: dict) -> None:
    print("test AUC yardsticks: ceiling (true logit) {auc_ceiling:.4f} | latents -> cluster "
          "centres {auc_cluster_centres:.4f} | random embeddings {auc_random_embeddings:.4f} | "
          "dense-only logistic regression {auc_dense_only:.4f}".format(**summary))


def _prepare(args: argparse.Namespace) -> ProcessedDataset:
    return prepare_dataset(load_dataset_spec(args.spec), args.work_dir)


def _prepare_cmd(args: argparse.Namespace) -> int:
    ds = _prepare(args)
    print(f"prepared {ds.root}: " + ", ".join(f"{s} {ds.num_rows(s):,} rows" for s in ds.splits))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    ds = _prepare(args)
    print(f"dataset {ds.meta['spec']['name']} ({ds.meta['spec']['format']}) prepared in {ds.root}")
    for split in ds.splits:
        labels = np.concatenate([
            pq.read_table(ds.root / f["path"], columns=["label"]).column("label").to_numpy()
            for f in ds.meta["splits"][split]["files"]])
        print(f"  {split:5s} {len(labels):>11,} rows, positive rate {labels.mean():.4f}")
    print(f"  {len(ds.dense_names)} dense features; {len(ds.feature_names)} categorical features "
          f"(ids by train count; the last id is OOV):")
    print(f"  {'feature':10s} {'ids':>10s} {'top-1 share':>12s} {'top-1% share':>13s} "
          f"{'OOV share':>10s}")
    for name in ds.feature_names:
        counts = ds.counts(name).numpy()
        total = max(int(counts.sum()), 1)
        head = max(1, (len(counts) - 1) // 100)
        print(f"  {name:10s} {len(counts):>10,} {counts[0] / total:>12.3f} "
              f"{counts[:head].sum() / total:>13.3f} {counts[-1] / total:>10.4f}")
    spec = load_dataset_spec(args.spec)
    # `mec data synth` writes synth.json beside its spec, one level above the split folders.
    for folder in (Path(args.spec).parent, spec.files("train")[0].parent.parent):
        if (folder / "synth.json").is_file():
            _print_aucs(json.loads((folder / "synth.json").read_text()))
            break
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``mec data {synth,prepare,inspect}``."""
    data = subparsers.add_parser("data", help="datasets: built-in data, preparation, inspection")
    sub = data.add_subparsers(dest="data_command", required=True)

    synth = sub.add_parser("synth", help="write the built-in Criteo-shaped data + its spec")
    synth.add_argument("--out", required=True, help="output folder (replaced atomically)")
    synth.add_argument("--scale", type=float, default=0.01,
                       help="times Criteo Kaggle's cardinalities (default 0.01)")
    synth.add_argument("--rows", type=int, default=1_000_000, help="rows in all (80/10/10 split)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--multi-valued", type=int, default=0,
                       help="number of extra multi-valued features M1..MN")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=_synth)

    for name, func, text in (("prepare", _prepare_cmd, "build vocabularies, counts and shards"),
                             ("inspect", _inspect, "prepare if needed, then print statistics")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--spec", required=True, help="dataset spec YAML")
        p.add_argument("--work-dir", required=True, help="folder for the prepared data (owned)")
        p.set_defaults(func=func)
