"""The fused serving lookup: every table in one ``embedding_bag`` call, op count independent of F.

Applies when all tables share one dim D and all compressed tables one L (what DLRM needs anyway).
Then every feature has L *slots* of width d = D / L: slot l of a compressed row is codebook entry
``codes[j, l]`` of subspace l, slot l of a full row is its l-th d-wide chunk. All codebooks and
full tables are stacked into one weight [R, d] (full table rows split into L chunks), all codes
into one [sum N, L] tensor, and a request becomes one gather of codes, one scatter of lookup rows
and one pooled lookup whose bags are ordered (sample, feature, slot): the pooled [B * F * L, d]
*is* the EBC layout [B, F * D] without a transpose. Requests with one id per bag skip the
scatter and the pooling (one gather of codes, one gather of rows), or are one call of a C++ kernel
(``compiled_pooled_lookup``).

Full tables stored int8 row-wise ([N, D + 8] uint8, see ``format.encode_weight``) stay in that
form: they are stacked apart (``packed``) and pooled by one
``torch.ops.quantized.embedding_bag_byte_rowwise_offsets`` call over all bags, whose result is
added into the float lookup's output; the float lookup reads an all-zero block for their ids,
and the packed lookup an all-zero row for the other features' ids, so both stay one call each,
without branches. One-id-per-bag requests dequantize the int8 rows inside the C++ kernel.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FusedTables:
    """The stacked tensors and per-feature plans of the fused lookup (built once at load)."""

    weight: torch.Tensor  # [R, d] float32: all codebooks and full-table chunks
    codes: torch.Tensor  # [sum N of compressed tables, L]
    feature_plan: torch.Tensor  # int64 [F, L + 2]: slot rows, codes base, compressed (1 / 0)
    feature_is_mean: torch.Tensor  # bool [F]
    num_slots: int  # L
    packed: torch.Tensor | None = None  # uint8 [sum N of int8 tables + 1, D + 8], a zero row last
    packed_plan: torch.Tensor | None = None  # int64 [F, 2]: first packed row, int8 (1) or not (0)


def can_fuse(dims: list[int], subspaces: list[int]) -> bool:
    """Whether the fused lookup applies: one dim for all tables, one L for the compressed ones."""
    return len(set(dims)) == 1 and len(set(subspaces)) <= 1


def build(
    table_features: list[int],
    table_compressed: list[tuple[torch.Tensor, torch.Tensor] | None],
    table_full: list[torch.Tensor | None],
    table_is_mean: list[bool],
    num_slots: int,
) -> FusedTables:
    """Stack the tables (per table: codes + codebooks [L, K, d], or a full weight: float [N, D],
    or int8 row-wise uint8 [N, D + 8], which goes to ``packed``)."""
    weights, codes, packed = [], [], []
    row_base, slot_stride, code_base, compressed, is_mean = [], [], [], [], []
    packed_base, is_packed = [], []
    rows = code_rows = packed_rows = 0
    code_dtype = torch.uint8
    for t, num in enumerate(table_features):
        pair = table_compressed[t]
        if pair is not None:
            table_codes, codebooks = pair
            num_sub, k, sub_dim = codebooks.shape
            weights.append(codebooks.float().reshape(num_sub * k, sub_dim))
            codes.append(table_codes)
            code_dtype = torch.promote_types(code_dtype, table_codes.dtype)
            entry = (rows, k, code_rows, True)
            code_rows += table_codes.shape[0]
        elif table_full[t] is not None and table_full[t].dtype == torch.uint8:
            full = table_full[t]
            packed.append(full)
            # Float slots read the zero block appended below (without_packed zeroes the ids).
            entry = (-1, 1, -1, False)
        else:
            full = table_full[t]
            assert full is not None
            weights.append(full.float().reshape(full.shape[0] * num_slots, -1))
            entry = (rows, 1, -1, False)  # codes base: the zero row appended below
        int8 = entry[0] < 0
        if int8:
            packed_base.extend([packed_rows] * num)
            packed_rows += packed[-1].shape[0]
        else:
            rows += weights[-1].shape[0]
            packed_base.extend([-1] * num)  # the packed zero row appended below
        is_packed.extend([int(int8)] * num)
        for _ in range(num):
            row_base.append(entry[0])
            slot_stride.append(entry[1])
            code_base.append(entry[2])
            compressed.append(entry[3])
            is_mean.append(table_is_mean[t])
    device = (weights or packed)[0].device
    packed_tensor: torch.Tensor | None = None
    packed_plan: torch.Tensor | None = None
    if packed:
        # int8 tables' float slots read L zero rows; the other features read a zero packed row.
        sub_dim = (packed[0].shape[1] - 8) // num_slots
        weights.append(torch.zeros(num_slots, sub_dim, device=device))
        row_base = [rows if base < 0 else base for base in row_base]
        packed.append(torch.zeros(1, packed[0].shape[1], dtype=torch.uint8, device=device))
        packed_tensor = torch.cat(packed).contiguous()
        packed_plan = torch.tensor(
            [[packed_rows if base < 0 else base, flag] for base, flag in zip(packed_base, is_packed)],
            dtype=torch.int64,
            device=device,
        )
    # A zero row last: full-table ids read it, so their code part is 0 without a branch.
    zero_row = torch.zeros(1, num_slots, dtype=code_dtype, device=device)
    stacked_codes = torch.cat([*(c.to(code_dtype) for c in codes), zero_row])
    code_base = [code_rows if base < 0 else base for base in code_base]

    plan = [
        [base + slot * step for slot in range(num_slots)] + [codes_at, int(is_compressed)]
        for base, step, codes_at, is_compressed in zip(row_base, slot_stride, code_base, compressed)
    ]
    return FusedTables(
        weight=torch.cat(weights).contiguous(),
        codes=stacked_codes.contiguous(),
        feature_plan=torch.tensor(plan, dtype=torch.int64, device=device),
        feature_is_mean=torch.tensor(is_mean, dtype=torch.bool, device=device),
        num_slots=num_slots,
        packed=packed_tensor,
        packed_plan=packed_plan,
    )


def _without_packed(
    values: torch.Tensor, lengths: torch.Tensor, packed_plan: torch.Tensor
) -> torch.Tensor:
    """``values`` with the ids of int8 (packed) features set to 0: their float slots read the
    zero block, whatever the id."""
    num_features = packed_plan.shape[0]
    keep = 1 - packed_plan[:, 1]
    per_feature = lengths.view(num_features, -1).sum(1)
    return values * torch.repeat_interleave(keep, per_feature, output_size=values.shape[0])


def _add_packed(
    pooled: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None,
    stride: int,
    packed: torch.Tensor,
    packed_plan: torch.Tensor,
    feature_is_mean: torch.Tensor,
    has_mean: bool,
) -> torch.Tensor:
    """``pooled`` [B, F * D] plus the pooled rows of the int8 tables (others read a zero row).

    The bags are pooled feature-major, as the ids come, by FBGEMM's byte row-wise kernel, and
    added into the sample-major ``pooled`` through a transposed view (no copy)."""
    num_features = packed_plan.shape[0]
    n = values.shape[0]
    per_feature = lengths.view(num_features, -1).sum(1)
    plan = torch.repeat_interleave(packed_plan, per_feature, dim=0, output_size=n)
    indices = values.long() * plan[:, 1] + plan[:, 0]
    offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).long()
    per_sample: torch.Tensor | None = None
    if weights is not None:
        per_sample = weights.float()
    part = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
        packed, indices, offsets, False, 0, False, per_sample, None, True
    )
    dim = part.shape[1]
    if has_mean:
        mean = feature_is_mean.repeat_interleave(stride)
        counts = lengths.clamp(min=1).to(part.dtype)
        part = part * torch.where(mean, counts.reciprocal(), torch.ones_like(counts)).unsqueeze(1)
    pooled.view(stride, num_features, dim).add_(part.view(num_features, stride, dim).transpose(0, 1))
    return pooled


@torch.fx.wrap
def fused_pooled_lookup(
    values: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None,
    stride: int,
    weight: torch.Tensor,
    codes: torch.Tensor,
    feature_plan: torch.Tensor,
    feature_is_mean: torch.Tensor,
    num_slots: int,
    has_mean: bool,
    packed: torch.Tensor | None = None,
    packed_plan: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pooled embeddings [B, F * D] in EBC layout from checked ids (feature-major, as a KJT).

    ``feature_plan`` is int64 [F, L + 2]: per feature the first lookup row of each slot (table
    base + l * K, or + l for a full table), the feature's first row in ``codes`` and whether it
    is compressed (1) or full (0). ``packed`` / ``packed_plan``: the int8 row-wise tables and,
    per feature, their first row and whether it reads them (see ``build``).
    """
    num_features = feature_plan.shape[0]
    num_bags = num_features * stride
    n = values.shape[0]
    device = values.device
    if not torch.jit.is_scripting():
        exporting = torch.compiler.is_exporting()
    else:
        exporting = False
    # int8 tables' ids read the float weight's zero block (their rows are added at the end).
    ids = values if packed_plan is None else _without_packed(values, lengths, packed_plan)
    # One id per bag (Criteo-style requests): no pooling, one gather straight into EBC layout.
    # Exported programs cannot branch on values, so they always take the general path.
    if not exporting and n == num_bags and bool((lengths == 1).all()):
        pooled = _one_hot_lookup(ids, weights, stride, weight, codes, feature_plan, num_slots)
    else:
        slots = torch.arange(num_slots, device=device)
        # Lookup row of every (id, slot).
        per_feature = lengths.view(num_features, stride).sum(1)
        plan = torch.repeat_interleave(feature_plan, per_feature, dim=0, output_size=n)
        compressed = plan[:, num_slots + 1]
        code_rows = ids * compressed + plan[:, num_slots]
        # Compressed: base + l * K + codes[id, l]; full: base + l + id * L (codes: the zero row).
        rows = codes.index_select(0, code_rows).long()
        rows += plan[:, :num_slots]
        rows += (ids * ((1 - compressed) * num_slots)).unsqueeze(1)  # [n, L]
        # Bags in (sample, feature, slot) order, so the pooled [B * F * L, d] is the EBC layout.
        # Bag (f, b) is bag b * F + f there; its L slot bags follow each other, len(f, b) each.
        to_sample_major = _transposed_arange(stride, num_features, device)
        to_feature_major = _transposed_arange(num_features, stride, device)
        sample_major_lengths = lengths.index_select(0, to_feature_major)
        offsets = torch.cat([lengths.new_zeros(1),
                             torch.cumsum(sample_major_lengths.repeat_interleave(num_slots), 0)])
        bag_offsets = torch.cumsum(lengths, 0) - lengths
        shift = offsets.index_select(0, to_sample_major * num_slots) - bag_offsets
        per_id = torch.repeat_interleave(torch.stack([shift, lengths], dim=1), lengths, dim=0,
                                         output_size=n)
        positions = (per_id[:, :1] + torch.arange(n, device=device).unsqueeze(1)
                     + slots * per_id[:, 1:]).reshape(-1)
        indices = torch.zeros_like(positions).scatter(0, positions, rows.reshape(-1))
        per_sample: torch.Tensor | None = None
        if weights is not None:
            per_sample = torch.zeros(
                positions.shape[0], dtype=torch.float32, device=device
            ).scatter(0, positions, weights.float().repeat_interleave(num_slots))
        pooled = F.embedding_bag(indices, weight, offsets, mode="sum",
                                 per_sample_weights=per_sample, include_last_offset=True)
        dim = weight.shape[1]
        if has_mean:
            mean = feature_is_mean.repeat(stride)
            counts = sample_major_lengths.clamp(min=1).to(pooled.dtype)
            scale = torch.where(mean, counts.reciprocal(), torch.ones_like(counts))
            pooled.view(num_bags, num_slots * dim).mul_(scale.unsqueeze(1))
        pooled = pooled.view(stride, num_features * num_slots * dim)
    if packed is not None and packed_plan is not None:
        pooled = _add_packed(pooled, values, lengths, weights, stride, packed, packed_plan,
                             feature_is_mean, has_mean)  # fmt: skip
    return pooled


@torch.fx.wrap
def compiled_pooled_lookup(
    values: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None,
    stride: int,
    weight: torch.Tensor,
    codes: torch.Tensor,
    feature_plan: torch.Tensor,
    feature_is_mean: torch.Tensor,
    num_slots: int,
    has_mean: bool,
    packed: torch.Tensor | None = None,
    packed_plan: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fused_pooled_lookup`` in C++ kernels (CPU, float32 ``weight``; see ``kernels``): requests
    with one id per bag in one call of ``torch.ops.mec_lookup.serve_one_hot`` (code rows gathered
    per feature with prefetching, then each sample's output row written once, int8 rows
    dequantized into it), any other in one call of ``torch.ops.mec_lookup.serve_pooled`` (the
    training module's pooling loops: codes read while each bag is summed, SIMD per subspace
    width; int8 rows dequantized while summed)."""
    if values.shape[0] == lengths.shape[0] and bool((lengths == 1).all()):
        return torch.ops.mec_lookup.serve_one_hot(
            values, codes, weight, feature_plan, stride, weights, packed, packed_plan
        )
    offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
    return torch.ops.mec_lookup.serve_pooled(
        values, offsets, weights, weight, codes, feature_plan, feature_is_mean, stride, packed,
        packed_plan,
    )  # fmt: skip


def _one_hot_lookup(
    values: torch.Tensor,
    weights: torch.Tensor | None,
    stride: int,
    weight: torch.Tensor,
    codes: torch.Tensor,
    feature_plan: torch.Tensor,
    num_slots: int,
) -> torch.Tensor:
    """``fused_pooled_lookup`` when every bag holds one id (MEAN = SUM then)."""
    num_features = feature_plan.shape[0]
    ids = torch.empty(stride, num_features, dtype=values.dtype, device=values.device)
    ids.copy_(values.view(num_features, stride).t())  # (sample, feature) order
    compressed = feature_plan[:, num_slots + 1]
    code_rows = ids * compressed + feature_plan[:, num_slots]
    rows = codes.index_select(0, code_rows.view(-1)).long().view(stride, num_features, num_slots)
    rows += feature_plan[:, :num_slots]
    rows += (ids * ((1 - compressed) * num_slots)).unsqueeze(2)
    dim = weight.shape[1]
    out = weight.index_select(0, rows.view(-1)).view(stride, num_features, num_slots * dim)
    if weights is not None:
        per_id = torch.empty(stride, num_features, dtype=torch.float32, device=values.device)
        per_id.copy_(weights.float().view(num_features, stride).t())
        out = out * per_id.unsqueeze(2)
    return out.view(stride, num_features * num_slots * dim)


def _transposed_arange(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """Entry (r, c) of arange(rows * cols).view(rows, cols) listed column by column.

    Written into a fresh tensor (not ``.t().reshape(-1)``, whose copy-or-view choice depends
    on a size being 1 and would pin an exported program's batch size).
    """
    out = torch.empty(cols, rows, dtype=torch.int64, device=device)
    out.copy_(torch.arange(rows * cols, device=device).view(rows, cols).t())
    return out.view(-1)
