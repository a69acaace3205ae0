"""Product k-means kernels: chunked nearest-entry search, k-means++ seeding, Lloyd iterations.

Shapes: x [n, L, d] (rows split into L sub-vectors), codebooks [L, K, d], codes [n, L].
All searches run as batched matmuls, ``|x|^2 - 2 x.c + |c|^2``, over row chunks so memory stays
bounded by ``chunk_rows * L * K`` floats.
"""

import torch


def sq_dists(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Squared distances between sub-vectors and entries: x [n, L, d], codebooks [L, K, d] -> [L, n, K]."""
    xt = x.transpose(0, 1)  # [L, n, d]
    cross = torch.bmm(xt, codebooks.transpose(1, 2))  # [L, n, K]
    return (
        xt.square().sum(-1, keepdim=True) - 2 * cross + codebooks.square().sum(-1)[:, None, :]
    ).clamp_min_(0)


@torch.no_grad()
def nearest(x: torch.Tensor, codebooks: torch.Tensor, chunk_rows: int = 65536) -> torch.Tensor:
    """Index of the nearest entry per subspace: x [n, L, d] -> long codes [n, L]."""
    out = torch.empty(x.shape[0], x.shape[1], dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], chunk_rows):
        chunk = x[start : start + chunk_rows]
        out[start : start + chunk.shape[0]] = sq_dists(chunk, codebooks).argmin(-1).T
    return out


@torch.no_grad()
def kmeans_pp(x: torch.Tensor, codebook_size: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding per subspace (D^2 sampling): x [n, L, d] -> codebooks [L, K, d].

    ``generator`` must live on the CPU; draws are made there so results match across devices.
    """
    n, num_subspaces, sub_dim = x.shape
    codebooks = torch.empty(num_subspaces, codebook_size, sub_dim, dtype=x.dtype, device=x.device)
    for sub in range(num_subspaces):
        xs = x[:, sub].contiguous()
        first = int(torch.randint(n, (1,), generator=generator))
        norms = xs.square().sum(-1)
        codebooks[sub, 0] = xs[first]
        best = (norms - 2 * (xs @ xs[first]) + norms[first]).clamp_min_(0)
        for k in range(1, codebook_size):
            # Inverse-CDF draw proportional to best (D^2 sampling); uniform if all rows are centres.
            cdf = best.double().cumsum(0).cpu()
            if cdf[-1] <= 0:
                cdf = torch.arange(1, n + 1, dtype=torch.float64)
            u = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
            pick = min(int(torch.searchsorted(cdf, u, right=True)), n - 1)
            codebooks[sub, k] = xs[pick]
            best = torch.minimum(best, (norms - 2 * (xs @ xs[pick]) + norms[pick]).clamp_min_(0))
    return codebooks


@torch.no_grad()
def centroid_sums(
    x: torch.Tensor, codes: torch.Tensor, codebook_size: int, row_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry weighted sums and weights of assigned sub-vectors.

    x [n, L, d], codes [n, L] -> (sums [L, K, d] float64, mass [L, K] float64).
    """
    n, num_subspaces, sub_dim = x.shape
    w = torch.ones(n, dtype=torch.float64, device=x.device) if row_weight is None else row_weight
    w = w.to(torch.float64)
    flat = (codes.long() + torch.arange(num_subspaces, device=x.device) * codebook_size).reshape(-1)
    sums = torch.zeros(num_subspaces * codebook_size, sub_dim, dtype=torch.float64, device=x.device)
    sums.index_add_(0, flat, (x.double() * w[:, None, None]).reshape(-1, sub_dim))
    mass = torch.zeros(num_subspaces * codebook_size, dtype=torch.float64, device=x.device)
    mass.index_add_(0, flat, w[:, None].expand(n, num_subspaces).reshape(-1))
    return sums.view(num_subspaces, codebook_size, sub_dim), mass.view(num_subspaces, codebook_size)


@torch.no_grad()
def lloyd(
    x: torch.Tensor, codebooks: torch.Tensor, iters: int, row_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Run ``iters`` (weighted) Lloyd iterations from ``codebooks``; empty entries keep their value."""
    codebooks = codebooks.clone()
    for _ in range(iters):
        codes = nearest(x, codebooks)
        sums, mass = centroid_sums(x, codes, codebooks.shape[1], row_weight)
        filled = mass > 0
        codebooks[filled] = (sums[filled] / mass[filled, None]).to(codebooks.dtype)
    return codebooks
