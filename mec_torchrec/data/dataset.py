"""``ProcessedDataset``: the prepared form of a dataset, served as torchrec ``Batch`` es."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mec_torchrec.data.errors import DataError

META_FILE = "dataset.json"
SHUFFLE_BUFFER_ROWS = 1 << 18  # rows held at once when shuffling: bounds memory


@dataclass(frozen=True)
class _Unit:
    """A slice of one row group: the unit of reading and of shuffling."""

    file: int
    row_group: int
    start: int
    length: int


@dataclass
class _Rows:
    """Decoded rows: labels [n], dense [n, n_dense], per feature values [sum of lengths] and
    lengths [n] (``None`` for a single-valued feature: every length is 1)."""

    labels: np.ndarray
    dense: np.ndarray
    sparse: list[tuple[np.ndarray, np.ndarray | None]]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> _Rows:
        """Rows ``idx`` (any order)."""
        sparse: list[tuple[np.ndarray, np.ndarray | None]] = []
        for values, lengths in self.sparse:
            if lengths is None:
                sparse.append((values[idx], None))
                continue
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            sel = lengths[idx]
            out_starts = np.concatenate([[0], np.cumsum(sel)[:-1]])
            gather = np.repeat(offsets[idx] - out_starts, sel) + np.arange(sel.sum())
            sparse.append((values[gather], sel))
        return _Rows(self.labels[idx], self.dense[idx], sparse)

    def split(self, batch_size: int) -> Iterator[_Rows]:
        """Consecutive slices of ``batch_size`` rows (the last may be shorter)."""
        offsets = [None if ln is None else np.concatenate([[0], np.cumsum(ln)])
                   for _, ln in self.sparse]
        for s in range(0, len(self), batch_size):
            e = min(s + batch_size, len(self))
            sparse = [(v[s:e], None) if o is None else (v[o[s]:o[e]], ln[s:e])
                      for (v, ln), o in zip(self.sparse, offsets)]
            yield _Rows(self.labels[s:e], self.dense[s:e], sparse)

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        if len(parts) == 1:
            return parts[0]
        sparse = []
        for f, (_, lengths) in enumerate(parts[0].sparse):
            values = np.concatenate([p.sparse[f][0] for p in parts])
            sparse.append((values, None if lengths is None else
                           np.concatenate([p.sparse[f][1] for p in parts])))
        return _Rows(np.concatenate([p.labels for p in parts]),
                     np.concatenate([p.dense for p in parts]), sparse)


class ProcessedDataset:
    """A dataset prepared by ``prepare_dataset``: id-mapped shards, vocabularies and train counts.

    Example::

        ds = prepare_dataset(load_dataset_spec("specs/data/synthetic.yaml"), "out/data")
        batch = next(ds.batches("train", 4096, shuffle=True, seed=epoch))
        batch.dense_features   # float32 [B, len(ds.dense_names)]
        batch.sparse_features  # KeyedJaggedTensor, keys ds.feature_names, int64 ids,
                               # lengths [F * B] (1 for single-valued features)
        batch.labels           # float32 [B]
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        meta_path = self.root / META_FILE
        if not meta_path.is_file():
            raise DataError(f"{self.root}: not a prepared dataset (no {META_FILE})")
        self.meta = json.loads(meta_path.read_text())
        self.dense_names: list[str] = self.meta["dense_names"]
        self.feature_names: list[str] = self.meta["feature_names"]
        self.num_embeddings: dict[str, int] = self.meta["num_embeddings"]
        self._files: dict[str, pq.ParquetFile] = {}

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def _split(self, split: str) -> dict:
        if split not in self.meta["splits"]:
            raise DataError(f"{self.root}: no split {split!r} (prepared: {self.splits})")
        return self.meta["splits"][split]

    def num_rows(self, split: str) -> int:
        return int(self._split(split)["rows"])

    @cached_property
    def _counts(self) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(
            pq.read_table(self.root / "vocab" / f"{name}.parquet", columns=["count"])
            .column("count").to_numpy().astype(np.int64)) for name in self.feature_names}

    def counts(self, feature: str) -> torch.Tensor:
        """Train-split occurrences per id: int64 [num_embeddings[feature]] (last entry: OOV)."""
        if feature not in self.num_embeddings:
            raise DataError(f"unknown feature {feature!r}; features are {self.feature_names}")
        return self._counts[feature]

    def vocabulary(self, feature: str) -> pa.Table:
        """Columns ``value`` (source value; null for the OOV row) and ``count``, in id order."""
        return pq.read_table(self.root / "vocab" / f"{feature}.parquet")

    def rank_range(self, split: str, rank: int, world_size: int, even: bool) -> tuple[int, int]:
        """Rows [start, stop) of ``split`` read by ``rank``: contiguous, disjoint across ranks.

        ``even=False`` partitions all rows; ``even=True`` gives every rank ``rows // world_size``
        rows (dropping at most ``world_size - 1`` trailing rows) so all ranks see as many batches.
        """
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside [0, world_size={world_size})")
        n = self.num_rows(split)
        if even:
            per = n // world_size
            if per == 0:
                raise DataError(f"split {split!r} has {n} rows, fewer than world_size {world_size}")
            return rank * per, (rank + 1) * per
        return rank * n // world_size, (rank + 1) * n // world_size

    def _units(self, split: str, start: int, stop: int) -> list[_Unit]:
        units, offset = [], 0
        for f, entry in enumerate(self._split(split)["files"]):
            for g, n in enumerate(entry["row_groups"]):
                lo, hi = max(start, offset), min(stop, offset + n)
                if lo < hi:
                    units.append(_Unit(f, g, lo - offset, hi - lo))
                offset += n
        return units

    def _read(self, split: str, unit: _Unit) -> _Rows:
        path = self.root / self._split(split)["files"][unit.file]["path"]
        pf = self._files.get(str(path))
        if pf is None:
            pf = self._files[str(path)] = pq.ParquetFile(path)
        t = pf.read_row_group(unit.row_group).slice(unit.start, unit.length)
        dense = np.stack([t.column(n).to_numpy() for n in self.dense_names], axis=1) \
            if self.dense_names else np.zeros((t.num_rows, 0), np.float32)
        sparse = []
        for name in self.feature_names:
            col = t.column(name).combine_chunks()
            if pa.types.is_list(col.type):
                lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
                sparse.append((col.flatten().to_numpy(), lengths.astype(np.int64)))
            else:
                sparse.append((col.to_numpy(), None))
        return _Rows(t.column("label").to_numpy(), dense.astype(np.float32), sparse)

    def _batch(self, rows: _Rows) -> Batch:
        n = len(rows)
        kjt = KeyedJaggedTensor(
            keys=self.feature_names,
            values=torch.from_numpy(np.concatenate([v for v, _ in rows.sparse])),
            lengths=torch.from_numpy(np.concatenate(
                [np.ones(n, np.int64) if ln is None else ln for _, ln in rows.sparse])),
        )
        return Batch(dense_features=torch.from_numpy(rows.dense), sparse_features=kjt,
                     labels=torch.from_numpy(rows.labels.astype(np.float32)))

    def batches(self, split: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                seed: int = 0, shuffle: bool = False, drop_last: bool = False,
                even: bool = True) -> Iterator[Batch]:
        """Stream ``split`` as ``Batch`` es of ``batch_size`` rows (the last may be smaller unless
        ``drop_last``). Each rank reads only its ``rank_range``. With ``shuffle``, row groups are
        visited in a seeded order and rows are shuffled within a buffer of ~``SHUFFLE_BUFFER_ROWS``
        rows (memory stays bounded); the same (seed, rank, world_size) gives the same batches.
        """
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        units = self._units(split, *self.rank_range(split, rank, world_size, even))
        rng = np.random.default_rng([seed, rank, world_size])
        if shuffle:
            units = [units[i] for i in rng.permutation(len(units))]
        carry: list[_Rows] = []
        held = 0
        buffer_rows = max(SHUFFLE_BUFFER_ROWS, batch_size) if shuffle else batch_size
        for i, unit in enumerate(units):
            carry.append(self._read(split, unit))
            held += unit.length
            if held < buffer_rows and i + 1 < len(units):
                continue
            rows = _Rows.concat(carry)
            if shuffle:
                rows = rows.take(rng.permutation(len(rows)))
            carry, held = [], 0
            for part in rows.split(batch_size):
                if len(part) == batch_size:
                    yield self._batch(part)
                else:
                    carry, held = [part], len(part)
        if carry and not drop_last:
            yield self._batch(_Rows.concat(carry))
