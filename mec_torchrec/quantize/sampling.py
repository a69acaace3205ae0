"""Which rows a quantizer fits on: popularity weights (PWR), a held-out slice, weighted draws.

Rows are drawn as *indices* with replacement, so a row of weight w is seen about w times as often
as a row of weight 1 without ever being copied w times.
"""

import torch


def pwr_weights(counts: torch.Tensor) -> torch.Tensor:
    """MEC's popularity weights: floor(log2(count)), and 1 when count < 2.

    counts: int64 [N], counts[j] = training occurrences of row j. Returns float64 [N] on the CPU.
    """
    counts = counts.to(device="cpu", dtype=torch.int64)
    w = torch.ones(counts.shape[0], dtype=torch.float64)
    big = counts >= 2
    # Integer floor(log2): bit length - 1, exact where float log2 can round up near powers of two.
    c = counts[big]
    bits = torch.zeros_like(c)
    while bool((c > 0).any()):
        bits += (c > 0).long()
        c = c >> 1
    w[big] = (bits - 1).double()
    return w


def split_holdout(
    num_rows: int, holdout_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniform random held-out slice for early stopping and the remaining training rows.

    Returns (train_ids, holdout_ids), both int64 on the CPU. The held-out slice holds
    min(holdout_size, N // 10) rows, and none when N < 20.
    """
    size = min(holdout_size, num_rows // 10)
    perm = torch.randperm(num_rows, generator=generator)
    return perm[size:].sort().values, perm[:size].sort().values


def draw_rows(
    weights: torch.Tensor, num: int, generator: torch.Generator, block: int = 1 << 24
) -> torch.Tensor:
    """``num`` row ids drawn with replacement with probability proportional to ``weights``.

    weights: float64 [n] (>= 0, not all zero). Returns int64 [num] on the CPU.
    ``torch.multinomial`` caps one call at 2**24 draws, hence the blocks.
    """
    parts = [
        torch.multinomial(weights, min(block, num - start), replacement=True, generator=generator)
        for start in range(0, num, block)
    ]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
