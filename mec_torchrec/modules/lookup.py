"""One FBGEMM table-batched pooled lookup over a list of ordinary embedding weights.

``DenseTableBatchedLookup`` runs ``torch.ops.fbgemm.dense_embedding_codegen_lookup_function``
(the kernel behind FBGEMM's ``DenseTableBatchedEmbeddingBagsCodegen``) over the concatenation of
the given weight tensors. The weights stay separate ``nn.Parameter`` s owned elsewhere (here: the
inner codebook EmbeddingBagCollection), so autograd reaches each of them and any torch optimizer
works; the concatenation is cheap because MEC codebooks are small.
"""

from __future__ import annotations

from itertools import accumulate
from math import log2

import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from torch import nn

from mec_torchrec.modules.device_cache import device_tensor


@torch.fx.wrap
def dense_pooled_lookup(
    weights: list[torch.Tensor],
    weights_offsets: tuple[int, ...],
    dim_offsets: tuple[int, ...],
    max_dim: int,
    hash_size_cumsum: tuple[int, ...],
    total_hash_size_bits: int,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: torch.Tensor | None,
) -> torch.Tensor:
    """Sum-pooled lookup of every feature in one kernel call: float32 [B, dim_offsets[-1]].

    The offset tuples are FBGEMM's TBE metadata (per feature: start of its table in the flat
    weights, output column start, first row of its table in the row space; see
    ``DenseTableBatchedEmbeddingBagsCodegen``).
    """
    device = indices.device
    flat = torch.cat([w.reshape(-1) for w in weights])
    return torch.ops.fbgemm.dense_embedding_codegen_lookup_function(
        dev_weights=flat,
        weights_offsets=device_tensor(weights_offsets, torch.int64, device),
        D_offsets=device_tensor(dim_offsets, torch.int32, device),
        total_D=dim_offsets[-1],
        max_D=max_dim,
        hash_size_cumsum=device_tensor(hash_size_cumsum, torch.int64, device),
        total_hash_size_bits=total_hash_size_bits,
        indices=indices,
        offsets=offsets.to(indices.dtype),
        pooling_mode=int(PoolingMode.SUM),
        indice_weights=per_sample_weights.float() if per_sample_weights is not None else None,
        feature_requires_grad=None,
        output_dtype=int(SparseType.FP32.as_int()),
    )


@torch.fx.wrap
def mean_scale(pooled: torch.Tensor, lengths: torch.Tensor, is_mean: tuple[bool, ...],
               dims: tuple[int, ...]) -> torch.Tensor:
    """Divide the columns of mean-pooled features by their bag lengths (empty bags stay 0)."""
    batch = pooled.shape[0]
    counts = lengths.view(len(is_mean), batch).t().clamp(min=1).to(pooled.dtype)  # B may be 0
    mean = device_tensor(is_mean, torch.bool, pooled.device)
    scale = torch.where(mean, counts.reciprocal(), torch.ones_like(counts))
    repeats = device_tensor(dims, torch.int64, pooled.device)
    return pooled * torch.repeat_interleave(scale, repeats, dim=1, output_size=pooled.shape[1])


class DenseTableBatchedLookup(nn.Module):
    """Pooled lookup of F features over T tables given as separate weight tensors, in one call.

    Args:
        table_shapes: (rows, dim) of each of the T tables, in the order ``forward`` gets them.
        feature_tables: for each of the F features, the table it reads.
        feature_is_mean: for each feature, whether it is mean-pooled (else sum).

    ``forward(weights, indices, offsets, lengths, per_sample_weights)`` returns float32
    [B, sum of feature dims]; feature f occupies its columns in order. ``indices`` are row ids
    within each feature's table (int64), ``offsets`` [F * B + 1] and ``lengths`` [F * B] describe
    the bags, feature-major like a KeyedJaggedTensor. Mean pooling divides the sum by the bag
    length (weighted bags too). The kernel metadata is configuration (Python tuples, made into
    tensors on the weights' device on first use), so the module holds no state of its own.

    Example::

        lookup = DenseTableBatchedLookup([(4, 2), (3, 2)], feature_tables=[0, 1],
                                         feature_is_mean=[False, False])
        w0, w1 = torch.randn(4, 2), torch.randn(3, 2)
        out = lookup([w0, w1], torch.tensor([0, 3, 2]), torch.tensor([0, 2, 3]),
                     torch.tensor([2, 1]), None)   # B = 1: [w0[0] + w0[3], w1[2]]
    """

    def __init__(
        self,
        table_shapes: list[tuple[int, int]],
        feature_tables: list[int] | tuple[int, ...],
        feature_is_mean: list[bool] | tuple[bool, ...],
    ) -> None:
        super().__init__()
        rows = [r for r, _ in table_shapes]
        dims = [table_shapes[t][1] for t in feature_tables]
        table_offsets = [0, *accumulate(r * d for r, d in table_shapes)]
        row_cumsum = [0, *accumulate(rows)]
        total_rows = row_cumsum[-1]
        self.total_hash_size_bits = int(log2(float(total_rows)) + 1) if total_rows else 0
        self.weights_offsets = tuple(table_offsets[t] for t in feature_tables)
        self.dim_offsets = (0, *accumulate(dims))
        self.hash_size_cumsum = (*(row_cumsum[t] for t in feature_tables), total_rows)
        self.feature_dims = tuple(dims)
        self.feature_is_mean = tuple(feature_is_mean)
        self.has_mean = any(feature_is_mean)

    def forward(
        self,
        weights: list[torch.Tensor],
        indices: torch.Tensor,
        offsets: torch.Tensor,
        lengths: torch.Tensor,
        per_sample_weights: torch.Tensor | None,
    ) -> torch.Tensor:
        pooled = dense_pooled_lookup(
            weights,
            self.weights_offsets,
            self.dim_offsets,
            max(self.feature_dims),
            self.hash_size_cumsum,
            self.total_hash_size_bits,
            indices,
            offsets,
            per_sample_weights,
        )
        if self.has_mean:
            pooled = mean_scale(pooled, lengths, self.feature_is_mean, self.feature_dims)
        return pooled
