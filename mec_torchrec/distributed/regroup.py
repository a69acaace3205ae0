"""The MEC module's `regroup`, applied to the sharded codebook output with one copy.

The stock sharded EBC's output awaitable concatenates the per-sharding outputs (data-parallel
features, table-wise features, ...) into one `KeyedTensor` in sharding order; `regroup` then
concatenates the per-feature blocks again in the plain-EBC order. Each full-width copy of a
[B, sum of dims] activation costs as much as an all-to-all on CPU, so `regrouped` waits for the
per-sharding outputs itself and hands `regroup` split views of them: one copy forward, and the
backward scatters into per-sharding gradients without an intermediate full-width tensor.
"""

from collections.abc import Callable

import torch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionAwaitable
from torchrec.distributed.types import LazyAwaitable
from torchrec.sparse.jagged_tensor import KeyedTensor

Regroup = Callable[[dict[str, torch.Tensor]], KeyedTensor]


class RegroupedPooledAwaitable(LazyAwaitable[KeyedTensor]):
    """Waits for the sharded codebook EBC's per-sharding outputs, then applies `regroup` once.

    Reads the awaitables, names and dims of TorchRec 1.8's `EmbeddingBagCollectionAwaitable`
    (the versions are pinned together).
    """

    def __init__(self, pooled: EmbeddingBagCollectionAwaitable, regroup: Regroup) -> None:
        super().__init__()
        self._pooled = pooled
        self._regroup = regroup

    def _wait_impl(self) -> KeyedTensor:
        pooled = self._pooled
        parts = [w.wait() for w in pooled._awaitables]
        for resize in pooled._resize_awaitables or []:
            resize.wait()
        names, dims = pooled._embedding_names, pooled._embedding_dims
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


def _regroup_keyed(regroup: Regroup, pooled: KeyedTensor) -> KeyedTensor:
    return regroup(pooled.to_dict())


def regrouped(
    pooled: LazyAwaitable[KeyedTensor], regroup: Regroup
) -> LazyAwaitable[KeyedTensor]:
    """`pooled` (the sharded codebook EBC's output) in the plain-EBC layout, via `regroup`.

    Takes the one-copy path for the stock awaitable without callbacks; anything else (variable
    batch sizes, mean-pooling callbacks) gets `regroup` as a callback on its finished output.
    """
    if type(pooled) is EmbeddingBagCollectionAwaitable and not pooled.callbacks:
        return RegroupedPooledAwaitable(pooled, regroup)
    pooled.callbacks.append(lambda keyed: _regroup_keyed(regroup, keyed))
    return pooled
