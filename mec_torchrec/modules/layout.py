"""The static map between a MEC collection's tables and the codebook tables that serve them.

Computed once from the configs; the per-step code (``remap``, ``lookup``, ``regroup``) only reads
it. Three feature orders matter:

* **outer**: the order a plain ``EmbeddingBagCollection`` of the same configs outputs (tables in
  order, each table's features in order). The input KJT is brought into this order first.
* **lookup**: for each outer feature ``f``, ``f@0 .. f@{L-1}`` if its table is compressed, else
  ``f``. Pooling these sub-features side by side *is* the outer output layout (the pooling of a
  concatenation is the concatenation of the pooled parts), so the lookup needs no regroup copy.
* **inner**: the feature order of the inner ``codebooks`` EmbeddingBagCollection (its tables in
  order, each table's features in order). Equal to the lookup order unless a compressed table
  has several features.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

from mec_torchrec.modules.config import MECTableConfig


def sub_name(name: str, subspace: int) -> str:
    """Name of subspace ``subspace`` of table or feature ``name``: ``"t_C3"`` -> ``"t_C3@2"``."""
    return f"{name}@{subspace}"


@dataclass(frozen=True)
class MECLayout:
    """Outer configs -> inner codebook configs, plus the per-feature plans of remap and lookup.

    Attributes:
        features: outer feature names (EBC output order).
        feature_sizes: num_embeddings of each outer feature's table (valid ids are [0, N)).
        feature_tables: table name of each outer feature.
        feature_dims: embedding_dim of each outer feature.
        table_codes: per outer table, its index into the list of compressed tables, or -1 if full.
        table_num_features: per outer table, its number of features.
        table_subspaces: per outer table, L (1 for a full table).
        compressed: names of the compressed tables, in table order.
        inner_tables: configs of the inner codebook EBC: per outer table ``t@0 .. t@{L-1}``
            (K rows x D/L, features ``f@l``) if compressed, else the table itself.
        inner_features: feature order of the inner EBC.
        lookup_features: the lookup order (see the module docstring).
        lookup_sources: outer feature index of each lookup feature.
        lookup_tables: inner table index of each lookup feature.
        lookup_dims: embedding dim of each lookup feature.
        lookup_is_mean: whether each lookup feature is mean-pooled.
        lookup_to_inner: permutation taking lookup order to inner order (None when equal).
    """

    features: list[str]
    feature_sizes: tuple[int, ...]
    feature_tables: list[str]
    feature_dims: list[int]
    table_codes: list[int]
    table_num_features: list[int]
    table_subspaces: list[int]
    compressed: list[str]
    inner_tables: list[EmbeddingBagConfig]
    inner_features: list[str]
    lookup_features: list[str]
    lookup_sources: tuple[int, ...]
    lookup_tables: tuple[int, ...]
    lookup_dims: tuple[int, ...]
    lookup_is_mean: tuple[bool, ...]
    lookup_to_inner: list[int] | None


def _check_table(table: EmbeddingBagConfig, mec: MECTableConfig | None) -> None:
    if not table.name or "." in table.name or "@" in table.name:
        raise ValueError(f"table name {table.name!r} must be non-empty without '.' or '@'")
    if table.data_type != DataType.FP32:
        raise ValueError(f"table {table.name!r}: only FP32 tables are supported, got {table.data_type}")
    if table.pooling not in (PoolingType.SUM, PoolingType.MEAN):
        raise ValueError(f"table {table.name!r}: pooling must be SUM or MEAN, got {table.pooling}")
    if mec is not None and table.embedding_dim % mec.num_subspaces != 0:
        raise ValueError(
            f"table {table.name!r}: embedding_dim {table.embedding_dim} is not divisible by "
            f"num_subspaces {mec.num_subspaces}"
        )


def build_layout(
    tables: list[EmbeddingBagConfig], compression: dict[str, MECTableConfig]
) -> MECLayout:
    """Validate the configs and derive every static map the module needs.

    Raises:
        ValueError: unknown table in ``compression``, duplicate table or feature names (a feature
            shared by two tables is not supported), dim not divisible by L, non-FP32 data or
            pooling other than SUM / MEAN.
    """
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate table names in {names}")
    unknown = sorted(set(compression) - set(names))
    if unknown:
        raise ValueError(f"compression names tables that do not exist: {unknown} (tables: {names})")

    features: list[str] = []
    sizes: list[int] = []
    feature_tables: list[str] = []
    feature_dims: list[int] = []
    table_codes: list[int] = []
    table_num_features: list[int] = []
    table_subspaces: list[int] = []
    compressed: list[str] = []
    inner_tables: list[EmbeddingBagConfig] = []
    lookup: list[tuple[str, int, int, int, bool]] = []  # name, source, inner table, dim, mean
    for table in tables:
        mec = compression.get(table.name)
        _check_table(table, mec)
        table_features = list(table.feature_names) or [table.name]
        first = len(features)
        features += table_features
        sizes += [table.num_embeddings] * len(table_features)
        feature_tables += [table.name] * len(table_features)
        feature_dims += [table.embedding_dim] * len(table_features)
        table_num_features.append(len(table_features))
        is_mean = table.pooling == PoolingType.MEAN
        if mec is None:
            table_codes.append(-1)
            table_subspaces.append(1)
            lookup += [
                (f, first + i, len(inner_tables), table.embedding_dim, is_mean)
                for i, f in enumerate(table_features)
            ]
            inner_tables.append(dataclasses.replace(table, feature_names=table_features))
            continue
        num_subspaces = mec.num_subspaces
        sub_dim = table.embedding_dim // num_subspaces
        table_codes.append(len(compressed))
        table_subspaces.append(num_subspaces)
        compressed.append(table.name)
        base = len(inner_tables)
        lookup += [
            (sub_name(f, sub), first + i, base + sub, sub_dim, is_mean)
            for i, f in enumerate(table_features)
            for sub in range(num_subspaces)
        ]
        for sub in range(num_subspaces):
            # Codebooks start with the init range of the table they replace, so a decoded row
            # (a concatenation of codebook rows) starts on the same scale as a full row.
            inner_tables.append(
                EmbeddingBagConfig(
                    num_embeddings=mec.codebook_size,
                    embedding_dim=sub_dim,
                    name=sub_name(table.name, sub),
                    feature_names=[sub_name(f, sub) for f in table_features],
                    pooling=table.pooling,
                    weight_init_min=table.get_weight_init_min(),
                    weight_init_max=table.get_weight_init_max(),
                    init_fn=table.init_fn,
                )
            )
    if len(set(features)) != len(features):
        raise ValueError(f"a feature is used by several tables, which is not supported: {features}")

    inner_features = [f for t in inner_tables for f in t.feature_names]
    lookup_features = [entry[0] for entry in lookup]
    position = {f: i for i, f in enumerate(lookup_features)}
    to_inner = [position[f] for f in inner_features]
    return MECLayout(
        features=features,
        feature_sizes=tuple(sizes),
        feature_tables=feature_tables,
        feature_dims=feature_dims,
        table_codes=table_codes,
        table_num_features=table_num_features,
        table_subspaces=table_subspaces,
        compressed=compressed,
        inner_tables=inner_tables,
        inner_features=inner_features,
        lookup_features=lookup_features,
        lookup_sources=tuple(entry[1] for entry in lookup),
        lookup_tables=tuple(entry[2] for entry in lookup),
        lookup_dims=tuple(entry[3] for entry in lookup),
        lookup_is_mean=tuple(entry[4] for entry in lookup),
        lookup_to_inner=None if to_inner == list(range(len(to_inner))) else to_inner,
    )
