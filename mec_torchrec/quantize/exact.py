"""Exact head rows: the most frequent rows get codebook entries of their own, so they decode exactly.

A few hundred ids carry most of a table's traffic (61-82 % for the 256 hottest ids of the demo's
compressed tables), and their reconstruction error is where product quantization loses AUC
(docs/benchmarks.md, "The head rows carry the gap"). Reserving, in every subspace, one entry per
head row makes those rows exact without a new storage format: codes stay [N, L] and codebooks
[L, K, D / L], so the training module, its sharder, checkpoints, the artifact and the serving
kernels serve them unchanged. The tail pays with K - H entries instead of K.
"""

import torch

from mec_torchrec.quantize.kmeans import sq_dists
from mec_torchrec.quantize.stats import quality_stats
from mec_torchrec.quantize.streaming import refit_codebooks
from mec_torchrec.quantize.table import CompressedTable


def head_rows(counts: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The ``num_rows`` ids of highest count (ties: lower id first), most frequent first."""
    order = torch.sort(counts.to("cpu", torch.float64), descending=True, stable=True).indices
    return order[:num_rows]


@torch.no_grad()
def reserve_exact_rows(
    weight: torch.Tensor,
    counts: torch.Tensor,
    table: CompressedTable,
    num_rows: int,
    row_weight: torch.Tensor | None = None,
    chunk_rows: int = 65536,
) -> CompressedTable:
    """``table`` with its ``num_rows`` most frequent rows decoding exactly to ``weight``'s rows.

    In each subspace the H = ``num_rows`` entries the other (tail) rows use least (by
    ``row_weight`` mass, every row alike when None) are freed and set to the head rows'
    sub-vectors, head row j (j-th most frequent) taking the j-th freed entry. Tail rows that used
    a freed entry move to the nearest kept entry; then every kept entry is refitted to the
    (weighted) mean of its tail rows, as the quantizers' final refit does. The quality stats are
    recomputed over the new codes (the fit's other stats kept), with ``exact_rows`` = H.

    Args:
        weight: the table's original rows [N, D] the codes were fitted to (any device; the
            result is on the CPU, read chunk by chunk as the quantizers' refit does).
        counts: training-split occurrence count per row [N]; the head is the top ``num_rows``.
        table: codes [N, L] and codebooks [L, K, D / L] of ``weight``.
        num_rows: H, with 0 < H < K (the tail keeps at least one entry) and H <= N.
        row_weight: per-row weight of the refit [N] (e.g. counts), or None.
    """
    n, num_subspaces, size = table.num_rows, table.num_subspaces, table.codebook_size
    if not 0 < num_rows < size or num_rows > n:
        raise ValueError(
            f"exact rows must be in (0, K) = (0, {size}) and at most N = {n}, got {num_rows}"
        )
    if tuple(weight.shape) != (n, table.dim) or tuple(counts.shape) != (n,):
        raise ValueError(
            f"weight {tuple(weight.shape)} and counts {tuple(counts.shape)} do not match the "
            f"table's [N, D] = [{n}, {table.dim}]"
        )
    head = head_rows(counts, num_rows)
    is_head = torch.zeros(n, dtype=torch.bool)
    is_head[head] = True
    codes = table.codes.to("cpu", torch.long, copy=True)
    codebooks = table.codebooks.cpu().clone()
    mass_w = torch.ones(n, dtype=torch.float64) if row_weight is None else row_weight.double().cpu()
    tail_w = mass_w.masked_fill(is_head, 0)
    freed = torch.empty(num_subspaces, num_rows, dtype=torch.long)
    sub_dim = table.dim // num_subspaces
    backwards = torch.arange(size - 1, -1, -1)
    for sub in range(num_subspaces):
        mass = torch.bincount(codes[:, sub], weights=tail_w, minlength=size)
        # Least tail mass first; ties go to the higher index so that lower entries stay put.
        order = backwards[torch.sort(mass[backwards], stable=True).indices]
        freed[sub] = order[:num_rows].sort().values
        kept = torch.ones(size, dtype=torch.bool)
        kept[freed[sub]] = False
        kept_ids = kept.nonzero().squeeze(1)
        moved = (~kept[codes[:, sub]] & ~is_head).nonzero().squeeze(1)
        for start in range(0, moved.numel(), chunk_rows):
            rows = moved[start : start + chunk_rows]
            x = weight[rows.to(weight.device), sub * sub_dim : (sub + 1) * sub_dim]
            x = x.to("cpu", torch.float32).view(-1, 1, sub_dim)
            near = sq_dists(x, codebooks[sub : sub + 1, kept_ids]).argmin(-1).squeeze(0)
            codes[rows, sub] = kept_ids[near]
        codes[head, sub] = freed[sub]
    codebooks = refit_codebooks(weight, codes, codebooks, row_weight=tail_w)
    head_x = weight[head.to(weight.device)].to("cpu", torch.float32)
    head_x = head_x.view(num_rows, num_subspaces, sub_dim)
    for sub in range(num_subspaces):
        codebooks[sub, freed[sub]] = head_x[:, sub]
    stats = {**table.stats, **quality_stats(weight, codes, codebooks, counts), "exact_rows": num_rows}
    return CompressedTable(codes, codebooks, stats)
