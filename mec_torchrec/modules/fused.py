"""Fused CPU MEC lookup: codes read inside the pooling loop, no L-fold code ids in memory.

The remap path (``remap.remap_values`` + one dense TBE call) writes, per compressed id, L int64
code ids plus L-fold lengths (and weights), then pools. ``fused_pooled_lookup`` instead reads
``codes[id, l]`` while pooling each bag (a C++ extension, ``csrc/mec_lookup.cpp``, built with
``torch.utils.cpp_extension`` on first use and cached under ``<sys.prefix>/torch_extensions``).
Its backward yields a dense gradient for each inner weight (the same gradients the dense TBE
gives) and none for the codes. CPU and FP32 only; ``MECEmbeddingBagCollection`` falls back to
the remap path when the extension is unavailable or the module is on CUDA. Loading the extension
also registers the serving kernels as operators, ``torch.ops.mec_lookup.*``
(``mec_torchrec.export.kernels``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from mec_torchrec.modules.layout import MECLayout

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "mec_lookup.cpp"
_BUILD = Path(sys.prefix) / "torch_extensions" / "mec_lookup"
_ext = None
_tried = False


def extension():
    """The compiled extension, or None if it cannot be built (warned once)."""
    global _ext, _tried
    if not _tried:
        _tried = True
        try:
            from torch.utils.cpp_extension import load

            _BUILD.mkdir(parents=True, exist_ok=True)
            _ext = load(
                name="mec_lookup",
                sources=[str(_SOURCE)],
                build_directory=str(_BUILD),
                extra_cflags=["-O3"],
                verbose=bool(os.environ.get("MEC_LOOKUP_VERBOSE")),
            )
        except Exception as error:  # noqa: BLE001 - any build failure means: use the TBE path
            logger.warning("fused MEC lookup unavailable, using the remap + TBE path: %s", error)
            _ext = None
    return _ext


def available() -> bool:
    """Whether the fused CPU kernel can be used (builds it on first call)."""
    return extension() is not None


def loaded() -> bool:
    """Whether the extension is loaded (never builds it)."""
    return _ext is not None


def is_built() -> bool:
    """Whether the extension's library is built from the current source, so that ``extension()``
    loads it without compiling."""
    library = _BUILD / "mec_lookup.so"
    return library.exists() and library.stat().st_mtime >= _SOURCE.stat().st_mtime


# (feat_start, feat_code, feat_mean, lk_table, lk_dim, lk_col, lk_feat, table_ptr, table_lk,
#  total_dim): plain tuples of ints, so an fx graph can hold the plan as a constant.
Plan = tuple[tuple[int, ...], ...]


def build_plan(layout: MECLayout) -> tuple:
    """The kernel's static plan of ``layout`` (see ``csrc/mec_lookup.cpp``)."""
    feat_start = [0] * (len(layout.features) + 1)
    for source in layout.lookup_sources:
        feat_start[source + 1] += 1
    for f in range(len(layout.features)):
        feat_start[f + 1] += feat_start[f]
    feat_code: list[int] = []
    for table, num in enumerate(layout.table_num_features):
        feat_code += [layout.table_codes[table]] * num
    feat_mean = [int(layout.lookup_is_mean[feat_start[f]]) for f in range(len(layout.features))]
    lk_col = [0]
    for dim in layout.lookup_dims[:-1]:
        lk_col.append(lk_col[-1] + dim)
    num_tables = len(layout.inner_tables)
    by_table: list[list[int]] = [[] for _ in range(num_tables)]
    for j, t in enumerate(layout.lookup_tables):
        by_table[t].append(j)
    table_ptr = [0]
    for readers in by_table:
        table_ptr.append(table_ptr[-1] + len(readers))
    return (
        tuple(feat_start),
        tuple(feat_code),
        tuple(feat_mean),
        tuple(layout.lookup_tables),
        tuple(layout.lookup_dims),
        tuple(lk_col),
        tuple(layout.lookup_sources),
        tuple(table_ptr),
        tuple(j for readers in by_table for j in readers),
        sum(layout.lookup_dims),
    )


def first_out_of_range(
    values: torch.Tensor, length_per_key: list[int], feature_sizes: tuple[int, ...]
) -> int | None:
    """Position of the first id outside [0, N) of its feature (``length_per_key`` ids each), -1
    if there is none; None when the kernel cannot tell (not loaded yet, or ids not on CPU).

    One pass in C++ instead of the five tensor ops of a torch bounds check. Never builds the
    extension, so callers on the TBE path pay no compile.
    """
    if _ext is None or values.device.type != "cpu":
        return None
    return _ext.first_out_of_range(values, length_per_key, feature_sizes)


class _FusedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, offsets, per_sample_weights, codes, plan, batch, *weights):
        feat_start, feat_code, feat_mean, lk_table, lk_dim, lk_col, _, _, _, total_dim = plan
        out = _ext.forward(
            ids,
            offsets,
            per_sample_weights,
            weights,
            codes,
            batch,
            total_dim,
            feat_start,
            feat_code,
            feat_mean,
            lk_table,
            lk_dim,
            lk_col,
        )
        ctx.plan, ctx.batch, ctx.codes = plan, batch, codes
        # The weight gradients need only the weights' shapes (leaf parameters: no cycle); their
        # values are read, and so saved, only for the per-sample weights' gradient.
        ctx.psw_grad = per_sample_weights is not None and ctx.needs_input_grad[2]
        ctx.weights = weights
        ctx.save_for_backward(ids, offsets, per_sample_weights, *(weights if ctx.psw_grad else ()))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ids, offsets, psw, *saved_weights = ctx.saved_tensors
        weights = saved_weights if ctx.psw_grad else ctx.weights
        (
            feat_start,
            feat_code,
            feat_mean,
            lk_table,
            lk_dim,
            lk_col,
            lk_feat,
            table_ptr,
            table_lk,
            _,
        ) = ctx.plan
        grads = _ext.backward(
            grad_out,
            ids,
            offsets,
            psw,
            weights,
            ctx.codes,
            ctx.batch,
            feat_start,
            feat_code,
            feat_mean,
            lk_table,
            lk_dim,
            lk_col,
            lk_feat,
            table_ptr,
            table_lk,
            ctx.psw_grad,
        )
        weight_grads = [
            g if need else None for g, need in zip(grads[:-1], ctx.needs_input_grad[6:])
        ]
        return (None, None, grads[-1] if ctx.psw_grad else None, None, None, None, *weight_grads)


@torch.fx.wrap
def fused_pooled_lookup(
    values: torch.Tensor,
    lengths: torch.Tensor,
    per_sample_weights: torch.Tensor | None,
    stride: int,
    codes: list[torch.Tensor],
    weights: list[torch.Tensor],
    plan: tuple,
) -> torch.Tensor:
    """Pooled embeddings [B, sum of dims] in EBC layout, straight from outer-order ids.

    Args:
        values / lengths / per_sample_weights: checked ids of every feature in outer order
            (the input KJT's tensors), ``lengths`` [F * B].
        stride: batch size B.
        codes: the codes [N, L] of each compressed table.
        weights: the inner EBC's weights (codebooks and full tables), in its table order.
        plan: ``build_plan(layout)``.
    """
    extension()
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths).to(torch.int64)
    psw = per_sample_weights.float().contiguous() if per_sample_weights is not None else None
    # Codes and weights are made contiguous (if ever needed) inside the kernel.
    return _FusedLookup.apply(
        values.to(torch.int64).contiguous(), offsets, psw, codes, plan, stride, *weights
    )
