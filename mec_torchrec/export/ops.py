"""The serving forward's building blocks: id check, key order, per-table pooled lookup.

All are ``torch.fx.wrap``-ed so torchrec's fx tracing keeps them as single calls, written in the
TorchScript subset so the traced graph scripts, and free of data-dependent Python branches under
``torch.export``; ``compiled_check_ids`` is ``check_ids`` with a C++ fast path (see ``kernels``).
Out-of-range ids are reported by a custom op (``torch.ops.mec_torchrec.checked_ids``) whose error names the feature, id and table size: an
exported program cannot raise a message built from tensor values, but it can call an op that
does. Importing this module registers the op, so a saved TorchScript or exported model needs
``import mec_torchrec.export`` to run.
"""

import json
from bisect import bisect_right
from itertools import accumulate

import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

OUT_OF_RANGE = ("error", "reserved")


@torch.library.custom_op("mec_torchrec::checked_ids", mutates_args=())
def checked_ids(
    values: torch.Tensor,
    lengths: torch.Tensor,
    feature_sizes: torch.Tensor,
    names: str,
    reserved: bool,
) -> torch.Tensor:
    """``values`` with every id in ``[0, N)`` of its feature's table, as a new tensor.

    Args:
        values: int ids of all features, feature-major (as in a KeyedJaggedTensor).
        lengths: [F * B] bag lengths.
        feature_sizes: int64 [F], N of each feature's table.
        names: JSON ``[[feature, table], ...]`` per feature, for the error message.
        reserved: serve an out-of-range id as its table's last row, N - 1 (the OOV row the data
            layer reserves), instead of raising.

    Raises:
        ValueError: an out-of-range id without ``reserved``, naming the first one's table, id,
            range and feature.
    """
    per_feature = lengths.view(feature_sizes.numel(), -1).sum(1)
    bounds = torch.repeat_interleave(feature_sizes, per_feature, output_size=values.numel())
    bad = (values < 0) | (values >= bounds)
    if not bool(bad.any()):
        return values.clone()
    if reserved:
        return torch.where(bad, bounds - 1, values)
    position = int(bad.nonzero()[0, 0])
    f = bisect_right(list(accumulate(per_feature.tolist())), position)
    feature, table = json.loads(names)[f]
    raise ValueError(
        f"table {table!r}: id {int(values[position])} out of range [0, {int(feature_sizes[f])}) "
        f"in feature {feature!r} (load with unknown_id_policy='reserved' to serve such ids as the "
        f"table's last row)"
    )


@checked_ids.register_fake
def _checked_ids_fake(values, lengths, feature_sizes, names, reserved):
    return torch.empty_like(values)


@torch.fx.wrap
def check_ids(
    values: torch.Tensor,
    lengths: torch.Tensor,
    feature_sizes: torch.Tensor,
    names: str,
    reserved: bool,
) -> torch.Tensor:
    """``checked_ids`` at the cost of a few ATen ops when every id is valid (the usual case).

    The custom op (a Python call) only runs when an id is out of range, to raise or to replace
    it; under ``torch.export``, which cannot branch on tensor values, it always runs.
    """
    if not torch.jit.is_scripting():  # noqa: SIM102 (TorchScript skips this block only as is)
        if torch.compiler.is_exporting():
            return torch.ops.mec_torchrec.checked_ids(
                values, lengths, feature_sizes, names, reserved
            )
    _check_jagged(values, lengths, feature_sizes.shape[0])
    per_feature = lengths.view(feature_sizes.shape[0], -1).sum(1)
    if int(per_feature.sum()) != values.shape[0]:
        raise ValueError(
            "input KeyedJaggedTensor: lengths sum to " + str(int(per_feature.sum()))
            + " but there are " + str(values.shape[0]) + " ids"
        )  # fmt: skip
    bounds = torch.repeat_interleave(feature_sizes, per_feature, output_size=values.shape[0])
    if bool(((values < 0) | (values >= bounds)).any()):
        return torch.ops.mec_torchrec.checked_ids(values, lengths, feature_sizes, names, reserved)
    return values


@torch.fx.wrap
def compiled_check_ids(
    values: torch.Tensor,
    lengths: torch.Tensor,
    feature_sizes: torch.Tensor,
    names: str,
    reserved: bool,
) -> torch.Tensor:
    """``check_ids`` in one C++ pass, ``torch.ops.mec_lookup.ids_in_range`` (CPU; see
    ``kernels``), when the batch is valid; ``check_ids`` itself otherwise, to raise its error or
    replace the out-of-range ids."""
    if torch.ops.mec_lookup.ids_in_range(values, lengths, feature_sizes):
        return values
    return check_ids(values, lengths, feature_sizes, names, reserved)


def _check_jagged(values: torch.Tensor, lengths: torch.Tensor, num_features: int) -> None:
    """Refuse ids that are not integers and lengths that are negative or not F x B (the
    lookups would fail with unrelated messages, or read the wrong bags)."""
    if values.is_floating_point() or values.dtype == torch.bool:
        raise ValueError("input KeyedJaggedTensor: ids must be integers, got " + str(values.dtype))
    if lengths.shape[0] == 0:
        raise ValueError("input KeyedJaggedTensor: a batch of 0 samples (serving needs >= 1)")
    if lengths.shape[0] % num_features != 0:
        raise ValueError(
            "input KeyedJaggedTensor: " + str(lengths.shape[0]) + " lengths for "
            + str(num_features) + " features"
        )  # fmt: skip
    if lengths.shape[0] > 0 and int(lengths.min()) < 0:
        raise ValueError("input KeyedJaggedTensor: negative length " + str(int(lengths.min())))


@torch.fx.wrap
def required_weights(features: KeyedJaggedTensor) -> torch.Tensor:
    """The per-id weights of a weighted module's input (without them it would serve all-ones
    weights, silently).

    Raises:
        ValueError: ``features`` carries no weights.
    """
    weights = features.weights_or_none()
    if weights is None:
        raise ValueError("input KeyedJaggedTensor has no weights, but is_weighted=True")
    return weights


@torch.fx.wrap
def in_feature_order(features: KeyedJaggedTensor, order: list[str]) -> KeyedJaggedTensor:
    """``features`` with its keys permuted into ``order`` (as is when already so).

    Raises:
        ValueError: a feature of ``order`` is missing.
    """
    keys = features.keys()
    if keys == order:
        return features
    indices: list[int] = []
    for name in order:
        if name not in keys:
            raise ValueError("input KeyedJaggedTensor lacks feature " + name)
        indices.append(keys.index(name))
    return features.permute(indices)


@torch.fx.wrap
def pooled_lookup(
    values: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None,
    stride: int,
    table_num_features: list[int],
    table_dims: list[int],
    table_is_mean: list[bool],
    table_slot: list[int],
    codes: list[torch.Tensor],
    codebooks: list[torch.Tensor],
    code_bases: list[torch.Tensor],
    full_weights: list[torch.Tensor],
) -> torch.Tensor:
    """Pooled embeddings [B, sum of feature dims] in EBC layout, from checked ids.

    Table t (features in order) reads ``codes[s]`` / ``codebooks[s]`` / ``code_bases[s]`` when
    ``table_slot[t] = s >= 0`` (row j = ``codebooks[s][codes[s][j] + code_bases[s]]``
    concatenated over subspaces; ``codebooks[s]`` is [L * K, D / L]), else
    ``full_weights[-1 - table_slot[t]]`` (float [N, D], or int8 row-wise uint8 [N, D + 8]). Bags are summed (times ``weights`` if given) and mean
    tables divide by the bag length, as the training module does.
    """
    bag_lengths_2d = lengths.view(-1, stride)
    per_feature = bag_lengths_2d.sum(1)
    table_counts: list[torch.Tensor] = []
    start = 0
    for num in table_num_features:
        table_counts.append(per_feature[start : start + num].sum())
        start += num
    counts: list[int] = torch.stack(table_counts).tolist()
    if not torch.jit.is_scripting():
        # torch.export sees data-dependent sizes here; state what holds for them.
        for c in counts:
            torch._check(c >= 0)
        torch._check(sum(counts) == values.shape[0])
    value_parts = torch.split(values, counts)
    weight_parts: list[torch.Tensor] = []
    if weights is not None:
        weight_parts = torch.split(weights.float(), counts)
    out: list[torch.Tensor] = []
    start = 0
    for t, num in enumerate(table_num_features):
        ids = value_parts[t]
        bag_lengths = bag_lengths_2d[start : start + num].reshape(-1)
        offsets = torch.cat([bag_lengths.new_zeros(1), bag_lengths.cumsum(0)])
        w: torch.Tensor | None = weight_parts[t] if weights is not None else None
        dim = table_dims[t]
        slot = table_slot[t]
        if slot >= 0:
            n = ids.shape[0]
            code_ids = codes[slot].index_select(0, ids).long() + code_bases[slot]
            rows = codebooks[slot].index_select(0, code_ids.reshape(-1)).view(n, dim)
            positions = torch.arange(n, device=ids.device)
            pooled = F.embedding_bag(
                positions, rows, offsets, mode="sum", per_sample_weights=w, include_last_offset=True
            )
        elif full_weights[-1 - slot].dtype == torch.uint8:  # int8 row-wise [N, D + 8]
            pooled = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                full_weights[-1 - slot], ids.long(), offsets.long(), False, 0, False, w, None, True
            )
        else:
            pooled = F.embedding_bag(
                ids,
                full_weights[-1 - slot],
                offsets,
                mode="sum",
                per_sample_weights=w,
                include_last_offset=True,
            )
        if table_is_mean[t]:
            pooled = pooled / bag_lengths.clamp(min=1).unsqueeze(1).to(pooled.dtype)
        if num > 1:
            # Side by side per feature; cat, not transpose + reshape, whose copy-or-view
            # depends on B == 1 and would pin an exported program's batch size.
            out.extend(pooled.view(num, stride, dim).unbind(0))
        else:
            out.append(pooled)
        start += num
    return torch.cat(out, dim=1)
