"""Input validation shared by the quantizers: every error names the offending sizes."""

import torch

from mec_torchrec.quantize.table import code_dtype


def check_config(num_subspaces: int, codebook_size: int) -> None:
    """Validate (L, K) before any data is seen."""
    if num_subspaces < 1:
        raise ValueError(f"num_subspaces must be >= 1, got {num_subspaces}")
    code_dtype(codebook_size)  # raises for K < 1 or K beyond int32 codes


def check_weight(weight: torch.Tensor, num_subspaces: int) -> None:
    """weight: float [N, D], finite, N >= 1, D divisible by L."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D tensor [N, D], got {shape}")
    num_rows, dim = weight.shape
    if num_rows == 0 or dim == 0:
        raise ValueError(f"weight is empty: shape ({num_rows}, {dim})")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    if dim % num_subspaces != 0:
        raise ValueError(f"dim D={dim} is not divisible by num_subspaces L={num_subspaces}")
    bad = int((~torch.isfinite(weight)).sum())
    if bad:
        raise ValueError(f"weight [{num_rows}, {dim}] has {bad} NaN/inf entries")
    # Squared distances are float32: beyond this magnitude they overflow to inf and the codes
    # become arbitrary (a silently useless table), so such a table must be rescaled first.
    limit = (torch.finfo(torch.float32).max / (4 * dim)) ** 0.5
    largest = float(weight.abs().max())
    if largest > limit:
        raise ValueError(
            f"weight [{num_rows}, {dim}] has entries up to {largest:.3g} in magnitude; squared "
            f"distances would overflow float32 beyond {limit:.3g} (rescale the table)"
        )


def check_fit_inputs(
    weight: torch.Tensor, counts: torch.Tensor, num_subspaces: int, codebook_size: int
) -> torch.Tensor:
    """Validate ``fit`` arguments; returns counts as int64 [N] on the CPU."""
    check_weight(weight, num_subspaces)
    num_rows = weight.shape[0]
    counts = torch.as_tensor(counts)
    if counts.dim() != 1 or counts.shape[0] != num_rows:
        raise ValueError(
            f"counts must have shape [N] = [{num_rows}] (one per row of weight), "
            f"got {tuple(counts.shape)}"
        )
    if counts.is_floating_point() and not torch.isfinite(counts).all():
        raise ValueError("counts contain NaN/inf")
    if (counts < 0).any():
        raise ValueError(
            f"counts must be >= 0; {int((counts < 0).sum())} of {num_rows} are negative"
        )
    if codebook_size > num_rows:
        raise ValueError(f"codebook_size K={codebook_size} exceeds the number of rows N={num_rows}")
    return counts.to(device="cpu", dtype=torch.int64)


def check_codes(codes: torch.Tensor, num_subspaces: int, codebook_size: int) -> None:
    """codes: integer [n, L] with values in [0, K)."""
    if codes.dim() != 2 or codes.shape[1] != num_subspaces:
        raise ValueError(f"codes must have shape [n, {num_subspaces}], got {tuple(codes.shape)}")
    if codes.is_floating_point():
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codebook_size):
        raise ValueError(
            f"codes out of range [0, {codebook_size}): min {int(codes.min())}, "
            f"max {int(codes.max())}"
        )
