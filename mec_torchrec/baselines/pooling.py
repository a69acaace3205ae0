"""Shared pieces of the baseline collections: per-feature ids and bag pooling in EBC layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

_MODES = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}


def pooling_mode(config: EmbeddingBagConfig) -> str:
    """``"sum"`` or ``"mean"`` for a table config (other poolings are refused)."""
    if config.pooling not in _MODES:
        raise ValueError(f"table {config.name!r}: pooling {config.pooling} is not SUM or MEAN")
    return _MODES[config.pooling]


def feature_order(tables: list[EmbeddingBagConfig]) -> list[tuple[str, EmbeddingBagConfig]]:
    """(feature, table) pairs in the order an ``EmbeddingBagCollection`` outputs them."""
    seen: set[str] = set()
    out = []
    for table in tables:
        for feature in table.feature_names:
            if feature in seen:
                raise ValueError(f"feature {feature!r} is read by more than one table")
            seen.add(feature)
            out.append((feature, table))
    return out


def per_feature(
    features: KeyedJaggedTensor, names: list[str]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(ids, lengths, weights) of each feature in ``names``; weights None when unweighted."""
    jagged = features.to_dict()
    missing = [n for n in names if n not in jagged]
    if missing:
        raise ValueError(
            f"input KeyedJaggedTensor lacks features {missing} (has {features.keys()})"
        )
    return [(jagged[n].values(), jagged[n].lengths(), jagged[n].weights_or_none()) for n in names]


def check_range(feature: str, ids: torch.Tensor, num_rows: int) -> None:
    """Raise for an id outside [0, num_rows): never look up a silent wrong row."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_rows):
        bad = ids[(ids < 0) | (ids >= num_rows)][0]
        raise ValueError(f"feature {feature!r}: id {int(bad)} out of range [0, {num_rows})")


def pool(
    weight: torch.Tensor,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    """Bags of rows ``weight[ids]`` ([B] ``lengths``) pooled to [B, D]; an empty bag is 0.

    One ``embedding_bag`` call: the gradient reaches only the rows read. Per-id ``weights``
    multiply rows (SUM pooling only, as in torch's ``EmbeddingBag``).
    """
    offsets = lengths.cumsum(0) - lengths
    return F.embedding_bag(ids, weight, offsets, mode=mode, per_sample_weights=weights)


def pool_rows(
    rows: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None, mode: str
) -> torch.Tensor:
    """Pool per-id rows [n, D] (already looked up) into bags [B, D]."""
    return pool(rows, torch.arange(rows.shape[0], device=rows.device), lengths, weights, mode)


class PooledCollection(EmbeddingBagCollectionInterface):
    """What the baseline collections share: the EBC interface and a forward in EBC layout.

    A subclass defines ``pooled(table, ids, lengths, weights, mode) -> [B, D]`` for one feature;
    ``forward`` checks ids, calls it per feature and lays the results out as an
    ``EmbeddingBagCollection`` of the same configs would (keys in table order).
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        device: torch.device | str | None,
        is_weighted: bool,
    ) -> None:
        super().__init__()
        self._configs = tables
        self._features = feature_order(tables)
        self._is_weighted = is_weighted
        self._device = torch.device(device or "cpu")

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The table configs, as given (full sizes)."""
        return self._configs

    def is_weighted(self) -> bool:
        """Whether the input KJT's weights multiply the rows."""
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        """Where the tables live."""
        return self._device

    def pooled(
        self,
        table: EmbeddingBagConfig,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        mode: str,
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings in EBC layout (see the subclass's docstring)."""
        names = [f for f, _ in self._features]
        pooled = []
        for (feature, t), (ids, lengths, w) in zip(self._features, per_feature(features, names)):
            check_range(feature, ids, t.num_embeddings)
            weights = w if self._is_weighted else None
            pooled.append(self.pooled(t, ids, lengths, weights, pooling_mode(t)))
        return KeyedTensor(
            keys=names,
            length_per_key=[t.embedding_dim for _, t in self._features],
            values=torch.cat(pooled, dim=1),
        )
