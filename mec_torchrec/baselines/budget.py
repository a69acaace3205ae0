"""Sizing a baseline to a byte budget (as stored: fp32 rows, nothing else)."""

from __future__ import annotations

import math


def hash_buckets(budget_bytes: int, dim: int) -> int:
    """Hash buckets of ``dim`` fp32 values that fit in ``budget_bytes`` (at least 1)."""
    return max(1, budget_bytes // (dim * 4))


def qr_remainder(num_rows: int, budget_bytes: int, dim: int) -> int:
    """The remainder size m whose Q and R tables (ceil(N / m) + m rows) best fill the budget.

    The largest m with ceil(N / m) + m <= budget rows; when even the smallest pair
    (m = ceil(sqrt(N))) is over budget, that smallest pair.
    """
    rows = budget_bytes // (dim * 4)
    smallest = math.isqrt(num_rows - 1) + 1 if num_rows > 1 else 1
    best = smallest
    for m in range(smallest, num_rows + 1):
        if math.ceil(num_rows / m) + m > rows:
            break
        best = m
    return best
