"""The hashing trick: each large table shares a small table of hash buckets."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from mec_torchrec.baselines.pooling import PooledCollection, pool
from mec_torchrec.modules.config import TableBytes

PRIME = 2_147_483_647  # 2^31 - 1: a * id + b stays inside int64 for ids below 2^31


class HashedEmbeddingBagCollection(PooledCollection):
    """An ``EmbeddingBagCollection`` whose large tables are replaced by hash buckets.

    A table named in ``buckets`` with N rows holds only M = ``buckets[name]`` rows; id j reads
    row ``h(j) = ((a * j + b) mod p) mod M`` (a universal hash, p = 2^31 - 1, a and b drawn per
    table from ``seed``), so about N / M ids share each row and learn it together. Other tables
    stay full. The ids of ``mec_torchrec.data`` are ordered by frequency, so a plain ``j mod M``
    would give the M most frequent ids rows of their own: a frequency-aware scheme a real hash of
    raw values does not have. The random hash keeps this the hashing trick.

    Called with a ``KeyedJaggedTensor`` (features of the tables, any key order) it returns the
    ``KeyedTensor`` an ``EmbeddingBagCollection`` of the same configs returns: keys in table
    order, values [B, sum of dims], each bag pooled by its table's SUM or MEAN (weights multiply
    rows when ``is_weighted``).

    Args:
        tables: the table configs, as for ``EmbeddingBagCollection``.
        buckets: table name -> number of hash buckets M (1 <= M); other tables stay full.
        seed: draws the hash constants.
        device: where the tables live.
        is_weighted: whether the input KJT's weights multiply the rows.

    Example::

        tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10_000,
                                     feature_names=["f"])]
        hashed = HashedEmbeddingBagCollection(tables, {"t": 100})  # 100 x 4 floats, 100x smaller
        kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([3, 9_999]),
                                lengths=torch.tensor([1, 1]))
        hashed(kjt).values().shape  # (2, 4)
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        buckets: dict[str, int],
        seed: int = 0,
        device: torch.device | str | None = None,
        is_weighted: bool = False,
    ) -> None:
        super().__init__(tables, device, is_weighted)
        unknown = set(buckets) - {t.name for t in tables}
        if unknown:
            raise ValueError(f"buckets name unknown tables {sorted(unknown)}")
        gen = torch.Generator().manual_seed(seed)
        self._hash: dict[str, tuple[int, int, int]] = {}
        self.weights = nn.ParameterDict()
        for t in tables:
            rows = buckets.get(t.name, t.num_embeddings)
            if rows < 1:
                raise ValueError(f"table {t.name!r}: {rows} buckets, need at least 1")
            if t.name in buckets:
                a, b = torch.randint(1, PRIME, (2,), generator=gen).tolist()
                self._hash[t.name] = (a, b, rows)
            bound = rows**-0.5  # torchrec's default init for a table of this many rows
            weight = torch.empty(rows, t.embedding_dim, device=self._device)
            self.weights[t.name] = nn.Parameter(weight.uniform_(-bound, bound))

    def rows_of(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """The stored row each id of ``table`` reads (the hash for a hashed table, else the id)."""
        if table not in self._hash:
            return ids
        a, b, m = self._hash[table]
        return (ids * a + b).remainder(PRIME).remainder(m)

    def pooled(
        self,
        table: EmbeddingBagConfig,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        mode: str,
    ) -> torch.Tensor:
        """One feature's bags [B, D], pooled from its table's hashed rows."""
        return pool(self.weights[table.name], self.rows_of(table.name, ids), lengths, weights, mode)

    def embedding_bytes(self) -> dict[str, TableBytes]:
        """Per table: fp32 bytes of the full table vs fp32 bytes of the rows held."""
        return {
            t.name: TableBytes(
                t.num_embeddings * t.embedding_dim * 4, self.weights[t.name].numel() * 4
            )
            for t in self._configs
        }
