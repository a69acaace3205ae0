"""Quality statistics of a quantized table, gathered in one streaming pass over the rows.

Frequency buckets (by train count, ties broken by row id): ``head`` = the top 1% of ids,
``torso`` = the next 19%, ``tail`` = the remaining 80%. Reconstruction error is measured in the
original space between each row and its decoded row; ``mse`` is the mean over rows and dims,
``rel_mse`` divides by the mean squared value of the rows, ``cosine`` is the mean per-row cosine.
"""

import math
from typing import Any

import torch

from mec_torchrec.quantize.table import decode_codes

BUCKETS = (("head", 0.01), ("torso", 0.19), ("tail", 0.80))


def bucket_of_rows(counts: torch.Tensor) -> torch.Tensor:
    """Bucket index per row (0 head, 1 torso, 2 tail): counts int64 [N] -> int64 [N]."""
    n = counts.shape[0]
    order = torch.argsort(-counts, stable=True)
    bucket = torch.empty(n, dtype=torch.int64)
    start = 0
    for b, (_, frac) in enumerate(BUCKETS):
        end = n if b == len(BUCKETS) - 1 else start + math.ceil(frac * n)
        bucket[order[start:end]] = b
        start = min(end, n)
    return bucket


def usage_stats(codes: torch.Tensor, codebook_size: int) -> dict[str, list[float] | list[int]]:
    """Per-codebook usage perplexity exp(H(hard code usage)) over all rows, and dead entries."""
    perplexity, dead = [], []
    for sub in range(codes.shape[1]):
        hist = torch.bincount(codes[:, sub].long().cpu(), minlength=codebook_size).double()
        p = hist / hist.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        perplexity.append(round(float(entropy.exp()), 4))
        dead.append(int((hist == 0).sum()))
    return {"perplexity": perplexity, "dead_codes": dead}


@torch.no_grad()
def quality_stats(
    weight: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    counts: torch.Tensor,
    chunk_rows: int = 262144,
) -> dict[str, Any]:
    """Reconstruction and usage statistics.

    weight [N, D] (any device), codes [N, L], codebooks [L, K, D/L], counts int64 [N].
    Returns a JSON-serialisable dict: ``mse``, ``rel_mse``, ``cosine`` overall and per bucket
    (``buckets[name]`` with ``rows``), ``perplexity`` and ``dead_codes`` per codebook.
    """
    bucket = bucket_of_rows(counts)
    nb = len(BUCKETS)
    sq_err = torch.zeros(nb, dtype=torch.float64)
    sq_norm = torch.zeros(nb, dtype=torch.float64)
    cos = torch.zeros(nb, dtype=torch.float64)
    rows = torch.bincount(bucket, minlength=nb).double()
    for start in range(0, weight.shape[0], chunk_rows):
        x = weight[start : start + chunk_rows].to(codebooks.device, torch.float32)
        x_hat = decode_codes(codes[start : start + x.shape[0]], codebooks)
        b = bucket[start : start + x.shape[0]]
        err = (x_hat - x).square().sum(-1).double().cpu()
        cosine = torch.nn.functional.cosine_similarity(x_hat, x, dim=-1, eps=1e-12).double().cpu()
        sq_err.index_add_(0, b, err)
        sq_norm.index_add_(0, b, x.square().sum(-1).double().cpu())
        cos.index_add_(0, b, cosine)
    dim = weight.shape[1]

    def summary(err: float, norm: float, c: float, n: float) -> dict[str, float]:
        return {
            "mse": err / max(n * dim, 1.0),
            "rel_mse": err / norm if norm > 0 else 0.0,
            "cosine": c / max(n, 1.0),
            "rows": int(n),
        }

    out: dict[str, Any] = summary(
        float(sq_err.sum()), float(sq_norm.sum()), float(cos.sum()), float(rows.sum())
    )
    out["buckets"] = {
        name: summary(float(sq_err[b]), float(sq_norm[b]), float(cos[b]), float(rows[b]))
        for b, (name, _) in enumerate(BUCKETS)
    }
    out.update(usage_stats(codes, codebooks.shape[1]))
    return out
