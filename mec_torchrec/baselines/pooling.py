"""Shared pieces of the baseline collections: per-feature ids and bag pooling in EBC layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

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
