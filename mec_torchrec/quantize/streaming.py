"""Passes over all N rows in bounded memory: encode with a query function, refit codebooks.

Only one chunk of ``chunk_rows`` rows is on the device at a time, so a table far larger than the
device memory (or than the fit sample) can be encoded.
"""

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from mec_torchrec.quantize.kmeans import centroid_sums, nearest
from mec_torchrec.quantize.table import code_dtype


@torch.no_grad()
def encode_rows(
    weight: torch.Tensor,
    codebooks: torch.Tensor,
    query: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_rows: int = 65536,
    progress: bool = False,
) -> torch.Tensor:
    """Nearest-entry codes of every row: weight [N, D] -> codes [N, L] (smallest dtype, CPU).

    ``query`` maps a chunk x [n, D] (on the codebooks' device) to the vectors that are assigned
    (the MEC encoder output); the identity when None (plain PQ).
    """
    num_subspaces, codebook_size, sub_dim = codebooks.shape
    codes = torch.empty(weight.shape[0], num_subspaces, dtype=code_dtype(codebook_size))
    bar = tqdm(total=weight.shape[0], desc="encode", unit="row", disable=not progress)
    for start in range(0, weight.shape[0], chunk_rows):
        x = weight[start : start + chunk_rows].to(codebooks.device, torch.float32)
        q = x if query is None else query(x)
        chunk_codes = nearest(q.view(-1, num_subspaces, sub_dim), codebooks, chunk_rows)
        codes[start : start + x.shape[0]] = chunk_codes.to(codes.dtype).cpu()
        bar.update(x.shape[0])
    bar.close()
    return codes


@torch.no_grad()
def refit_codebooks(
    weight: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    chunk_rows: int = 262144,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each entry becomes the mean of the original sub-vectors assigned to it (over all N rows),
    weighted by ``row_weight`` [N] (every row alike when None).

    Given the codes this minimises the (weighted) reconstruction error of ``decode`` in the
    original space; entries no row (of positive weight) uses keep their value. Returns a new
    float32 [L, K, d] tensor.
    """
    num_subspaces, codebook_size, sub_dim = codebooks.shape
    sums = torch.zeros(
        num_subspaces, codebook_size, sub_dim, dtype=torch.float64, device=codebooks.device
    )
    mass = torch.zeros(num_subspaces, codebook_size, dtype=torch.float64, device=codebooks.device)
    for start in range(0, weight.shape[0], chunk_rows):
        x = weight[start : start + chunk_rows].to(codebooks.device, torch.float32)
        c = codes[start : start + x.shape[0]].to(codebooks.device)
        w = None if row_weight is None else row_weight[start : start + x.shape[0]]
        s, m = centroid_sums(
            x.view(-1, num_subspaces, sub_dim), c, codebook_size,
            None if w is None else w.to(codebooks.device),
        )
        sums += s
        mass += m
    out = codebooks.clone().float()
    filled = mass > 0
    out[filled] = (sums[filled] / mass[filled, None]).float()
    return out
