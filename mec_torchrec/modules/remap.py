"""Ids -> code ids: the sparse half of a MEC lookup, as fx-wrapped functions.

TorchRec's pipelines fx-trace the model; these functions loop over tables and read data-dependent
sizes, so they are wrapped (``torch.fx.wrap``) and appear in a traced graph as single calls.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mec_torchrec.modules import fused as _fused
from mec_torchrec.modules.device_cache import device_tensor

UNKNOWN_ID_POLICIES = ("error", "reserved")


@torch.fx.wrap
def in_feature_order(features: KeyedJaggedTensor, order: list[str]) -> KeyedJaggedTensor:
    """``features`` with its keys permuted into ``order`` (returned as is when already so).

    Raises:
        ValueError: a feature of ``order`` is missing from ``features``, the KJT has a
            variable batch size per feature (not supported), or it is malformed (see
            :func:`check_jagged`).
    """
    if features.variable_stride_per_key():
        raise ValueError("variable-batch (VBE) KeyedJaggedTensors are not supported")
    check_jagged(features)
    keys = features.keys()
    if keys == order:
        return features
    index = {k: i for i, k in enumerate(keys)}
    missing = [f for f in order if f not in index]
    if missing:
        raise ValueError(f"input KeyedJaggedTensor lacks features {missing} (has {keys})")
    return features.permute([index[f] for f in order])


def check_jagged(features: KeyedJaggedTensor) -> None:
    """Refuse a KJT whose tensors disagree: the kernels would read past them (or crash).

    Raises:
        ValueError: ids (values) that are not integers; a number of lengths other than
            keys x batch size; a negative length; lengths that do not sum to the number of ids;
            weights of another count than the ids.
    """
    values, lengths, weights = features.values(), features.lengths(), features.weights_or_none()
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"input KeyedJaggedTensor: ids must be integers, got {values.dtype}")
    keys, stride = features.keys(), features.stride()
    if lengths.numel() != len(keys) * stride:
        raise ValueError(
            f"input KeyedJaggedTensor: {lengths.numel()} lengths for {len(keys)} keys x batch "
            f"size {stride}"
        )
    # One reduction (~30 us for 26 x 4096 lengths): a negative length crashes the fused kernel.
    if lengths.numel() and int(lengths.min()) < 0:
        position = int((lengths < 0).nonzero()[0, 0])
        raise ValueError(
            f"input KeyedJaggedTensor: negative length {int(lengths[position])} in feature "
            f"{keys[position // stride]!r} (sample {position % stride})"
        )
    total = sum(features.length_per_key())
    if total != values.numel():
        raise ValueError(
            f"input KeyedJaggedTensor: lengths sum to {total} but there are {values.numel()} ids"
        )
    if weights is not None and weights.numel() != values.numel():
        raise ValueError(
            f"input KeyedJaggedTensor: {weights.numel()} weights for {values.numel()} ids"
        )


@torch.fx.wrap
def check_ids(
    values: torch.Tensor,
    length_per_key: list[int],
    feature_sizes: tuple[int, ...],
    features: list[str],
    tables: list[str],
    policy: str,
) -> torch.Tensor:
    """Enforce ``0 <= id < N`` per feature; returns the ids to look up.

    Args:
        values: ids of all features, concatenated in ``features`` order.
        length_per_key: number of ids per feature.
        feature_sizes: N of each feature's table.
        features / tables: names, for the error message.
        policy: ``"error"`` raises; ``"reserved"`` replaces each out-of-range id by N - 1, the
            last row of its table (the OOV row that ``mec_torchrec.data`` reserves for rare and
            unseen values): for a compressed table that is the code tuple ``codes[N - 1]``.

    Raises:
        ValueError: under ``"error"``, naming the first bad id, its feature, table and range.
    """
    if _fused.first_out_of_range(values, length_per_key, feature_sizes) == -1:
        return values  # checked in one C++ pass (CPU, once the fused kernel is loaded)
    counts = torch.tensor(length_per_key, device=values.device)
    sizes = device_tensor(feature_sizes, torch.int64, values.device)
    bounds = torch.repeat_interleave(sizes, counts, output_size=values.numel())
    bad = (values < 0) | (values >= bounds)
    if not bool(bad.any()):
        return values
    if policy == "reserved":
        return torch.where(bad, bounds - 1, values)
    position = int(bad.nonzero()[0, 0])
    f = bisect_right(list(accumulate(length_per_key)), position)
    raise ValueError(
        f"table {tables[f]!r}: id {int(values[position])} out of range "
        f"[0, {feature_sizes[f]}) in feature {features[f]!r} "
        f"(pass unknown_id_policy='reserved' to map such ids to the table's last row)"
    )


@torch.fx.wrap
def remap_values(
    values: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None,
    stride: int,
    length_per_key: list[int],
    codes: list[torch.Tensor],
    table_codes: list[int],
    table_num_features: list[int],
    lookup_sources: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Expand outer-order ids into lookup-order code ids.

    For a feature ``f`` of a compressed table with codes [N, L], the lookup features
    ``f@0 .. f@{L-1}`` hold ``codes[ids, l]`` (int64), with the lengths and weights of ``f``;
    features of full tables pass through.

    Args:
        values / lengths / weights: the input KJT's tensors, features in outer order.
        stride: batch size B.
        length_per_key: ids per outer feature.
        codes: the codes tensor of each compressed table.
        table_codes: per outer table, index into ``codes`` or -1 for a full table.
        table_num_features: per outer table, its number of features.
        lookup_sources: the outer feature behind each lookup feature.

    Returns:
        (values int64, lengths, weights or None) in lookup order.
    """
    counts: list[int] = []
    start = 0
    for num in table_num_features:
        counts.append(sum(length_per_key[start : start + num]))
        start += num
    value_parts = values.split(counts)
    weight_parts = weights.split(counts) if weights is not None else None
    compressed = [t for t, code_index in enumerate(table_codes) if code_index >= 0]
    gathered = [codes[table_codes[t]].index_select(0, value_parts[t]) for t in compressed]
    # Lookup order wants each feature's codes subspace-major ([L, n] flattened). In the common
    # case (one feature per table, equal L and id counts, e.g. one-hot batches) one stacked
    # transpose serves all tables; per-op overhead, not bytes, is what costs here.
    transposed: dict[int, list[torch.Tensor]] = {}
    if (
        gathered
        and all(table_num_features[t] == 1 for t in compressed)
        and all(g.shape == gathered[0].shape for g in gathered)
    ):
        block = torch.stack(gathered).transpose(1, 2).reshape(len(gathered), -1)
        transposed = {t: [block[k]] for k, t in enumerate(compressed)}
    else:
        starts = list(accumulate(table_num_features, initial=0))
        for t, g in zip(compressed, gathered):
            feature_counts = length_per_key[starts[t] : starts[t + 1]]
            transposed[t] = [part.t().reshape(-1) for part in g.split(feature_counts)]
    out_values: list[torch.Tensor] = []
    out_weights: list[torch.Tensor] = []
    first = 0
    for t, code_index in enumerate(table_codes):
        num = table_num_features[t]
        w = weight_parts[t] if weight_parts is not None else None
        if code_index < 0:
            out_values.append(value_parts[t])
            if w is not None:
                out_weights.append(w)
        else:
            out_values += transposed[t]
            if w is not None:
                num_subspaces = codes[code_index].shape[1]
                feature_counts = length_per_key[first : first + num]
                out_weights += [part.repeat(num_subspaces) for part in w.split(feature_counts)]
        first += num
    new_values = torch.cat(out_values).to(torch.int64)
    sources = device_tensor(lookup_sources, torch.int64, lengths.device)
    new_lengths = lengths.view(len(length_per_key), stride).index_select(0, sources).reshape(-1)
    new_weights = torch.cat(out_weights) if weights is not None else None
    return new_values, new_lengths, new_weights
