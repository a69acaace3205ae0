"""MEC's loss terms, each with a real gradient to the encoder and the codebooks.

Shared shapes: q [B, L, d] encoder output split into subspaces, codebooks [L, K, d],
``dist`` [L, B, K] squared distances between q and every entry, *normalised* by ``d * var``
(``var`` = per-dimension variance of the data) so temperatures do not depend on the data's scale.
"""

import math

import torch
import torch.nn.functional as F


def normalized_dists(q: torch.Tensor, codebooks: torch.Tensor, var: float) -> torch.Tensor:
    """q [B, L, d], codebooks [L, K, d] -> [L, B, K] squared distances / (d * var), differentiable."""
    qt = q.transpose(0, 1)
    cross = torch.bmm(qt, codebooks.transpose(1, 2))
    sq = qt.square().sum(-1, keepdim=True) - 2 * cross + codebooks.square().sum(-1)[:, None, :]
    return sq.clamp_min(0) / (q.shape[-1] * var)


def quantize_ste(q: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Quantized rows with a straight-through gradient: value C[codes], gradient to q *and* C.

    q [B, L, d], codes [B, L] long -> [B, L, d]. Forward equals the decoded entries; backward
    passes d(loss)/d(out) to q unchanged (straight-through) and to the selected entries.
    """
    picked = codebooks[torch.arange(codebooks.shape[0], device=q.device), codes]
    return picked + (q - q.detach())


def usage_kl(dist: torch.Tensor, temperature: float) -> torch.Tensor:
    """Uniform-usage regulariser: mean over codebooks of KL(mean soft assignment || uniform).

    Soft assignment p = softmax(-dist / temperature) over the K entries, averaged over the batch:
    p_bar [L, K]; KL(p_bar || U) = sum p_bar log p_bar + log K, 0 exactly at uniform usage.
    """
    p_bar = torch.softmax(-dist / temperature, dim=-1).mean(1)
    return ((p_bar * p_bar.clamp_min(1e-12).log()).sum(-1) + math.log(dist.shape[-1])).mean()


def make_negatives(
    codes: torch.Tensor, codebook_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """MEC's semi-synthetic negatives, one per row.

    For every row, one subspace r (uniform over L) gets a different code, uniform over the other
    K - 1 codes; all other sub-codes stay. Draws are per row and come from ``generator`` (CPU).
    codes [B, L] long -> (negative codes [B, L] long, replaced subspace [B] long).
    """
    if codebook_size < 2:
        raise ValueError("contrastive negatives need codebook_size >= 2")
    batch, num_subspaces = codes.shape
    sub = torch.randint(num_subspaces, (batch,), generator=generator).to(codes.device)
    shift = torch.randint(1, codebook_size, (batch,), generator=generator).to(codes.device)
    rows = torch.arange(batch, device=codes.device)
    neg = codes.clone()
    neg[rows, sub] = (codes[rows, sub] + shift) % codebook_size
    return neg, sub


def contrastive_loss(
    dist: torch.Tensor,
    codes: torch.Tensor,
    neg_codes: torch.Tensor,
    neg_sub: torch.Tensor,
    temperature: float,
    in_batch_negatives: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """InfoNCE of the encoder output against its own quantized tuple vs. negatives.

    dist [L, B, K] normalised distances, codes/neg_codes [B, L] long, neg_sub [B].
    Logits are -distance / temperature to the positive tuple C[codes], to the one-subspace
    negative C[neg_codes] and, if ``in_batch_negatives`` = m > 0, to the positive tuples of m other
    rows of the batch (rows with an identical tuple are masked out). The negative differs from the
    positive only in subspace r, so its distance is d_pos - dist[r, b, codes[b, r]] +
    dist[r, b, neg[b, r]]: the loss pushes q away from the replaced entry and toward its own.
    """
    batch = dist.shape[1]
    rows = torch.arange(batch, device=dist.device)
    per_sub = dist.gather(-1, codes.T.unsqueeze(-1)).squeeze(-1)  # [L, B]
    d_pos = per_sub.sum(0)
    d_neg = d_pos - per_sub[neg_sub, rows] + dist[neg_sub, rows, neg_codes[rows, neg_sub]]
    logits = [-d_pos, -d_neg]
    if in_batch_negatives > 0 and batch > 1:
        shifts = torch.randint(1, batch, (in_batch_negatives,), generator=generator).tolist()
        for shift in shifts:
            other = codes.roll(shift, 0)
            d_other = dist.gather(-1, other.T.unsqueeze(-1)).squeeze(-1).sum(0)
            same = (other == codes).all(-1)
            logits.append((-d_other).masked_fill(same, float("-inf")))
    logits_t = torch.stack(logits, dim=1) / temperature
    return F.cross_entropy(logits_t, torch.zeros(batch, dtype=torch.long, device=dist.device))
