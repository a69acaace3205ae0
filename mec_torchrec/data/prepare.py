"""``prepare_dataset``: vocabularies + counts (train only) and id-mapped parquet shards, idempotent."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mec_torchrec.data.dataset import META_FILE, ProcessedDataset
from mec_torchrec.data.errors import DataError
from mec_torchrec.data.readers import iter_source_batches
from mec_torchrec.data.spec import SPLITS, DatasetSpec
from mec_torchrec.data.vocab import Vocabulary, build_vocabularies
from mec_torchrec.io import atomic_dir

LAYOUT_VERSION = 1
SHARD_ROWS = 1 << 20  # rows per processed parquet file
ROW_GROUP_ROWS = 1 << 14  # the unit of reading and shuffling in ProcessedDataset.batches


def fingerprint(spec: DatasetSpec) -> str:
    """Hash of the spec and of every source file's path, size and mtime."""
    h = hashlib.sha256(json.dumps([LAYOUT_VERSION, spec.to_dict()], sort_keys=True).encode())
    for split in SPLITS:
        for path in spec.files(split):
            for part in _source_parts(spec, path):
                st = os.stat(part) if part.exists() else None
                h.update(f"{split}|{part}|{st and st.st_size}|{st and st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _source_parts(spec: DatasetSpec, path: Path) -> list[Path]:
    if spec.format == "criteo_npy" and path.name.endswith("_dense.npy"):
        stem = str(path)[: -len("_dense.npy")]
        return [Path(f"{stem}_{p}.npy") for p in ("dense", "sparse", "labels")]
    return [path]


def _write_split(spec: DatasetSpec, split: str, vocabs: dict[str, Vocabulary],
                 out: Path) -> dict[str, Any]:
    """Map ``split``'s ids through ``vocabs`` and write it as shards; returns its metadata."""
    files: list[dict[str, Any]] = []
    writer: pq.ParquetWriter | None = None
    rows_in_shard = 0
    total = 0

    def close() -> None:
        if writer is not None:
            writer.close()
            meta = pq.read_metadata(out / files[-1]["path"])
            files[-1]["row_groups"] = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]

    for sb in iter_source_batches(spec, split):
        columns = {"label": sb.data.column("label")}
        columns.update({name: sb.data.column(name) for name in spec.dense})
        for name in spec.categorical:
            columns[name] = pa.array(vocabs[name].lookup(sb.data.column(name)))
        for name in spec.multi_valued:
            col = sb.data.column(name)
            ids = vocabs[name].lookup(col.flatten())
            lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy()
            offsets = pa.array([0, *lengths.cumsum()], pa.int32())
            columns[name] = pa.ListArray.from_arrays(offsets, pa.array(ids))
        table = pa.table(columns)
        if writer is None or rows_in_shard >= SHARD_ROWS:
            close()
            files.append({"path": f"{split}/part-{len(files):05d}.parquet"})
            (out / split).mkdir(exist_ok=True)
            writer = pq.ParquetWriter(out / files[-1]["path"], table.schema)
            rows_in_shard = 0
        writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        rows_in_shard += table.num_rows
        total += table.num_rows
    close()
    return {"rows": total, "files": files}


def prepare_dataset(spec: DatasetSpec, work_dir: str | os.PathLike) -> ProcessedDataset:
    """Build (or reuse) the processed form of ``spec`` in ``work_dir``, which it owns.

    One streaming pass over train builds each feature's vocabulary and per-id counts
    (``vocab/{feature}.parquet``); each split is then id-mapped into ``{split}/part-*.parquet``
    (int64 ids, float32 dense and labels). ``dataset.json`` records a fingerprint of the spec and the
    source files: a later call with the same fingerprint returns the existing data untouched.
    The folder is replaced atomically, so it is always either the old or the new complete version.
    """
    work_dir = Path(work_dir)
    print_ = fingerprint(spec)
    meta_path = work_dir / META_FILE
    if meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()).get("fingerprint") == print_:
                return ProcessedDataset(work_dir)
        except json.JSONDecodeError:
            pass
    if work_dir.exists() and any(work_dir.iterdir()) and not meta_path.is_file():
        raise DataError(f"{work_dir} exists and is not a prepared dataset; refusing to replace it")
    features = spec.feature_names
    vocabs, _ = build_vocabularies(iter_source_batches(spec, "train"), features, spec.min_count)
    with atomic_dir(work_dir) as tmp:
        (tmp / "vocab").mkdir()
        for name, vocab in vocabs.items():
            pq.write_table(vocab.to_table(), tmp / "vocab" / f"{name}.parquet")
        splits = {split: _write_split(spec, split, vocabs, tmp) for split in SPLITS
                  if spec.split_patterns(split)}
        meta = {
            "fingerprint": print_, "layout_version": LAYOUT_VERSION, "spec": spec.to_dict(),
            "dense_names": list(spec.dense), "feature_names": features,
            "multi_valued": list(spec.multi_valued),
            "num_embeddings": {name: v.num_embeddings for name, v in vocabs.items()},
            "splits": splits,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return ProcessedDataset(work_dir)
