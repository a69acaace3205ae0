"""Turning the sharded codebook EBC's output into MEC features, copying as little as possible.

The stock sharded EBC's output holds the per-sharding outputs (data-parallel features, table-wise
features, ...) with features in sharding order, and TorchRec's own sharded EBC hands that order
out as is (consumers use `to_dict()` or `KeyedTensor.regroup`, never positions). MEC features are
the concatenation of their sub-features `f@0 .. f@{L-1}`, and the planner usually puts those side
by side in order (all codebooks data_parallel), so the output is the same tensor under merged
keys: no copy at all for one sharding, one concatenation of the per-sharding outputs otherwise
(exactly what the stock EBC does). Only when sub-features are scattered (e.g. codebooks of one
table on different ranks) does the module's `regroup` run, on split views.

Which columns form which feature is learned from `regroup` itself, run once per key order on a
probe whose entries are their own column numbers: no naming convention is assumed.
"""

from collections.abc import Callable

import torch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionAwaitable
from torchrec.distributed.types import LazyAwaitable
from torchrec.sparse.jagged_tensor import KeyedTensor

Regroup = Callable[[dict[str, torch.Tensor]], KeyedTensor]
Layout = tuple[list[str], list[int]]


def contiguous_layout(regroup: Regroup, names: list[str], dims: list[int]) -> Layout | None:
    """Keys and dims of `regroup`'s output if each of its features is a contiguous, in-order
    column range of the input laid out as `names`/`dims`, ordered by position; else None."""
    starts = [0, *torch.tensor(dims).cumsum(0).tolist()]
    probe = {
        name: torch.arange(start, start + dim, dtype=torch.float64).unsqueeze(0)
        for name, start, dim in zip(names, starts, dims)
    }
    out = regroup(probe)
    spans = []
    for key, columns in zip(out.keys(), out.values()[0].split(out.length_per_key())):
        first, width = int(columns[0]), columns.numel()
        if not torch.equal(columns, torch.arange(first, first + width, dtype=columns.dtype)):
            return None
        spans.append((first, key, width))
    spans.sort()
    position = 0
    for first, _, width in spans:
        if first != position:
            return None
        position += width
    if position != starts[-1]:
        return None
    return [key for _, key, _ in spans], [width for _, _, width in spans]


class ShardedRegroup:
    """Maps the codebook EBC's per-sharding outputs to MEC features (see the module docstring)."""

    def __init__(self, regroup: Regroup) -> None:
        self._regroup = regroup
        self._names: list[str] | None = None
        self._layout: Layout | None = None

    def __call__(self, parts: list[torch.Tensor], names: list[str], dims: list[int]) -> KeyedTensor:
        if names != self._names:
            self._names = list(names)
            self._layout = contiguous_layout(self._regroup, names, dims)
        if self._layout is not None:
            values = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            keys, widths = self._layout
            return KeyedTensor(keys=keys, length_per_key=widths, values=values)
        features: dict[str, torch.Tensor] = {}
        start = 0
        for part in parts:
            end, width = start, 0
            while width < part.shape[1]:
                width += dims[end]
                end += 1
            features.update(zip(names[start:end], part.split(dims[start:end], dim=1)))
            start = end
        return self._regroup(features)

    def keyed(self, pooled: KeyedTensor) -> KeyedTensor:
        """The same for an already assembled `KeyedTensor`."""
        return self([pooled.values()], pooled.keys(), pooled.length_per_key())


class RegroupedPooledAwaitable(LazyAwaitable[KeyedTensor]):
    """Waits for the sharded codebook EBC's per-sharding outputs, then applies `ShardedRegroup`.

    Reads the awaitables, names and dims of TorchRec 1.8's `EmbeddingBagCollectionAwaitable`
    (the versions are pinned together) instead of letting it concatenate them first.
    """

    def __init__(self, pooled: EmbeddingBagCollectionAwaitable, regroup: ShardedRegroup) -> None:
        super().__init__()
        self._pooled = pooled
        self._regroup = regroup

    def _wait_impl(self) -> KeyedTensor:
        pooled = self._pooled
        parts = [w.wait() for w in pooled._awaitables]
        for resize in pooled._resize_awaitables or []:
            resize.wait()
        return self._regroup(parts, pooled._embedding_names, pooled._embedding_dims)


def regrouped(
    pooled: LazyAwaitable[KeyedTensor], regroup: ShardedRegroup
) -> LazyAwaitable[KeyedTensor]:
    """`pooled` (the sharded codebook EBC's output) as MEC features.

    The stock awaitable without callbacks is waited on part by part; anything else (variable
    batch sizes, mean-pooling callbacks) gets the regroup as a callback on its finished output.
    """
    if type(pooled) is EmbeddingBagCollectionAwaitable and not pooled.callbacks:
        return RegroupedPooledAwaitable(pooled, regroup)
    pooled.callbacks.append(regroup.keyed)
    return pooled
