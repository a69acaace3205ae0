"""Vocabulary: per-feature value -> id mapping and per-id train counts, built in one streaming pass.

Ids are ordered by train count, descending (id 0 = most frequent), ties broken by value ascending
(nulls, i.e. missing values, last). Values seen fewer than ``min_count`` times share the OOV id,
which is always the last id; values absent from train map to it too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mec_torchrec.data.readers import SourceBatch

HASH_LOOKUP_MAX = 1 << 16  # larger vocabularies use a sorted search (see lookup)
_COMPACT_EVERY = 32  # merge partial counts every N batches: bounded memory, few group-bys


@dataclass(frozen=True)
class Vocabulary:
    """One feature's vocabulary: ``values[i]`` has id ``i``; ``counts`` has one more entry (OOV).

    values: Arrow array [num_embeddings - 1]; counts: int64 [num_embeddings].
    """

    values: pa.Array
    counts: np.ndarray

    @property
    def num_embeddings(self) -> int:
        return len(self.counts)

    @property
    def oov_id(self) -> int:
        return len(self.counts) - 1

    def lookup(self, values: pa.Array) -> np.ndarray:
        """Ids (int64) of ``values``; values outside the vocabulary get the OOV id."""
        if len(self.values) <= HASH_LOOKUP_MAX:
            ids = pc.index_in(values, value_set=self.values, skip_nulls=False)
            return pc.fill_null(ids, self.oov_id).to_numpy(zero_copy_only=False).astype(np.int64)
        return self._sorted_lookup(values)

    @cached_property
    def _sorted(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Non-null values sorted [m], their ids [m], and the id of the null value (or OOV)."""
        valid = pc.is_valid(self.values).to_numpy(zero_copy_only=False)
        ids = np.flatnonzero(valid)
        keys = _numpy_keys(self.values.filter(pa.array(valid)))
        order = np.argsort(keys, kind="stable")
        null_id = int(np.flatnonzero(~valid)[0]) if not valid.all() else self.oov_id
        return keys[order], ids[order], null_id

    def _sorted_lookup(self, values: pa.Array) -> np.ndarray:
        # pyarrow's index_in rebuilds its hash table on every call: for vocabularies of millions
        # that dominates, so large ones are searched in a sorted copy built once.
        keys, ids, null_id = self._sorted
        valid = pc.is_valid(values).to_numpy(zero_copy_only=False)
        if len(keys) == 0:
            return np.where(valid, self.oov_id, null_id).astype(np.int64)
        filler = 0 if pa.types.is_integer(values.type) else ""  # null slots are overwritten below
        query = _numpy_keys(pc.fill_null(values, filler))
        pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
        out = np.where(keys[pos] == query, ids[pos], self.oov_id)
        return np.where(valid, out, null_id).astype(np.int64)

    def to_table(self) -> pa.Table:
        """Rows in id order; the last row is the OOV id (value null)."""
        values = pa.concat_arrays([self.values, pa.nulls(1, self.values.type)])
        return pa.table({"value": values, "count": pa.array(self.counts, pa.int64())})

    @staticmethod
    def from_table(table: pa.Table) -> Vocabulary:
        values = table.column("value").combine_chunks()
        return Vocabulary(values.slice(0, len(values) - 1),
                          table.column("count").to_numpy().astype(np.int64))


def _numpy_keys(values: pa.Array) -> np.ndarray:
    """Non-null ``values`` as a comparable numpy array (int64, or fixed-width bytes)."""
    if pa.types.is_integer(values.type):
        return values.to_numpy(zero_copy_only=False).astype(np.int64)
    # NumPy's fixed-width strings drop trailing NULs ("a\0" would equal "a"); a final 0x01 byte
    # keeps every value distinct. Only equality and one consistent order matter here.
    return np.array([v.encode() + b"\x01" for v in values.to_pylist()], dtype=bytes)


def _flat(column: pa.Array) -> pa.Array:
    return pc.list_flatten(column) if pa.types.is_list(column.type) else column


class _Counter:
    """Streaming value counts of one feature: partial value_counts merged by a group-by."""

    def __init__(self) -> None:
        self.parts: list[pa.Table] = []

    def add(self, column: pa.Array) -> None:
        vc = pc.value_counts(_flat(column))
        self.parts.append(pa.table({"value": vc.field("values"), "count": vc.field("counts")}))
        if len(self.parts) >= _COMPACT_EVERY:
            self.parts = [self._merged()]

    def _merged(self) -> pa.Table:
        table = pa.concat_tables(self.parts)
        merged = table.group_by("value", use_threads=False).aggregate([("count", "sum")])
        return merged.rename_columns(["value", "count"])

    def vocabulary(self, min_count: int) -> Vocabulary:
        table = self._merged()
        order = pc.sort_indices(table, sort_keys=[("count", "descending"),
                                                  ("value", "ascending", "at_end")])
        table = table.take(order)
        counts = table.column("count").to_numpy().astype(np.int64)
        kept = int(np.searchsorted(-counts, -min_count, side="right"))
        values = table.column("value").combine_chunks().slice(0, kept)
        return Vocabulary(values, np.append(counts[:kept], counts[kept:].sum()))


def build_vocabularies(batches: Iterable[SourceBatch], features: list[str],
                       min_count: int) -> tuple[dict[str, Vocabulary], int]:
    """One pass over ``batches`` (the train split): vocabularies of ``features`` and the row count."""
    counters = {name: _Counter() for name in features}
    rows = 0
    for sb in batches:
        rows += sb.data.num_rows
        for name in features:
            counters[name].add(sb.data.column(name))
    return {name: c.vocabulary(min_count) for name, c in counters.items()}, rows
