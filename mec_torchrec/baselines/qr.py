"""Quotient-remainder embeddings (Shi et al., KDD 2020): two small tables per large one."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from mec_torchrec.baselines.pooling import PooledCollection, pool_rows
from mec_torchrec.modules.config import TableBytes


class QREmbeddingBagCollection(PooledCollection):
    """An ``EmbeddingBagCollection`` whose large tables are quotient-remainder pairs.

    A table named in ``remainders`` with N rows and m = ``remainders[name]`` holds a quotient
    table Q of ceil(N / m) rows and a remainder table R of m rows; id j is
    ``Q[j // m] * R[j % m]`` (element-wise product, the paper's best operation). Every id gets
    its own (quotient, remainder) pair, so unlike hashing no two ids share a whole embedding, at
    ceil(N / m) + m rows instead of N. Both tables start uniform in [sqrt(1 / N), 1], as in the
    paper's reference code (facebookresearch/dlrm, ``tricks/qr_embedding_bag.py``), so products
    start neither tiny nor of random sign. Other tables stay full (torchrec's default init).

    Bags are pooled after the product (the product of pooled parts would be wrong), by the
    table's SUM or MEAN; the output is the ``KeyedTensor`` an ``EmbeddingBagCollection`` of the
    same configs returns (keys in table order, values [B, sum of dims]).

    Args:
        tables: the table configs, as for ``EmbeddingBagCollection``.
        remainders: table name -> m, the remainder table's rows (1 <= m <= N).
        device: where the tables live.
        is_weighted: whether the input KJT's weights multiply the rows.

    Example::

        tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10_000,
                                     feature_names=["f"])]
        qr = QREmbeddingBagCollection(tables, {"t": 100})  # Q: 100 rows, R: 100 rows
        kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([3, 9_999]),
                                lengths=torch.tensor([1, 1]))
        qr(kjt).values().shape  # (2, 4)
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        remainders: dict[str, int],
        device: torch.device | str | None = None,
        is_weighted: bool = False,
    ) -> None:
        super().__init__(tables, device, is_weighted)
        self._remainders = dict(remainders)
        by_name = {t.name: t for t in tables}
        unknown = set(remainders) - set(by_name)
        if unknown:
            raise ValueError(f"remainders name unknown tables {sorted(unknown)}")
        self.full = nn.ParameterDict()
        self.quotient = nn.ParameterDict()
        self.remainder = nn.ParameterDict()
        for t in tables:
            n, d = t.num_embeddings, t.embedding_dim
            if t.name not in remainders:
                bound = n**-0.5
                self.full[t.name] = nn.Parameter(
                    torch.empty(n, d, device=self._device).uniform_(-bound, bound)
                )
                continue
            m = remainders[t.name]
            if not 1 <= m <= n:
                raise ValueError(f"table {t.name!r}: remainder size {m} not in [1, {n}]")
            low = math.sqrt(1.0 / n)
            for store, rows in ((self.quotient, math.ceil(n / m)), (self.remainder, m)):
                weight = torch.empty(rows, d, device=self._device).uniform_(low, 1.0)
                store[t.name] = nn.Parameter(weight)

    def rows(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """The embedding of each id of ``table``: [n] -> [n, D]."""
        if table not in self._remainders:
            return self.full[table][ids]
        m = self._remainders[table]
        quotient = self.quotient[table][ids.div(m, rounding_mode="floor")]
        return quotient * self.remainder[table][ids.remainder(m)]

    def pooled(
        self,
        table: EmbeddingBagConfig,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        mode: str,
    ) -> torch.Tensor:
        """One feature's bags [B, D], pooled after the quotient-remainder product."""
        return pool_rows(self.rows(table.name, ids), lengths, weights, mode)

    def embedding_bytes(self) -> dict[str, TableBytes]:
        """Per table: fp32 bytes of the full table vs fp32 bytes of Q and R (or the full table)."""
        out = {}
        for t in self._configs:
            if t.name in self.full:
                held = [self.full[t.name]]
            else:
                held = [self.quotient[t.name], self.remainder[t.name]]
            full = t.num_embeddings * t.embedding_dim * 4
            out[t.name] = TableBytes(full, sum(p.numel() * 4 for p in held))
        return out
