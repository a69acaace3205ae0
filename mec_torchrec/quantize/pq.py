"""PQQuantizer: plain product quantization (k-means per subspace), the baseline for MEC."""

import time

import torch

from mec_torchrec.quantize.checks import check_codes, check_config, check_fit_inputs, check_weight
from mec_torchrec.quantize.kmeans import kmeans_pp, lloyd
from mec_torchrec.quantize.stats import quality_stats
from mec_torchrec.quantize.streaming import encode_rows, refit_codebooks
from mec_torchrec.quantize.table import CompressedTable, decode_codes


class PQQuantizer:
    """Plain product quantizer: k-means++ seeding + Lloyd iterations per subspace, no encoder.

    Rows [N, D] are split into L sub-vectors of D/L dims; each subspace gets its own codebook
    of K entries fitted by k-means on a uniform random sample of rows (counts are used only for
    the head/torso/tail statistics). All N rows are then encoded in a streaming pass and every
    entry is refitted once as the mean of the rows assigned to it (a final Lloyd update on the
    full table).

    Args:
        num_subspaces: L, sub-vectors per row (D % L == 0).
        codebook_size: K, entries per codebook (codes are uint8 for K <= 256).
        iters: Lloyd iterations on the sample after k-means++ seeding.
        sample_size: rows drawn uniformly (without replacement) for the Lloyd iterations.
        init_size: rows of that sample used for k-means++ seeding (sequential in K).
        seed: seeds every random draw; equal seeds give identical codes and codebooks.
        device: where the k-means and encoding run ("cpu", "cuda", ...).
        chunk_rows: rows per chunk in the streaming encode pass (bounds memory).
        progress: show a tqdm bar while encoding.

    Example::

        >>> w = torch.randn(1000, 16)
        >>> table = PQQuantizer(num_subspaces=4, codebook_size=16, seed=0).fit(w, torch.ones(1000))
        >>> table.codes.shape, table.codebooks.shape
        (torch.Size([1000, 4]), torch.Size([4, 16, 4]))
    """

    def __init__(
        self,
        num_subspaces: int,
        codebook_size: int,
        *,
        iters: int = 10,
        sample_size: int = 65536,
        init_size: int = 65536,
        seed: int = 0,
        device: str | torch.device = "cpu",
        chunk_rows: int = 65536,
        progress: bool = False,
    ) -> None:
        check_config(num_subspaces, codebook_size)
        self.num_subspaces = num_subspaces
        self.codebook_size = codebook_size
        self.iters = iters
        self.sample_size = sample_size
        self.init_size = init_size
        self.seed = seed
        self.device = torch.device(device)
        self.chunk_rows = chunk_rows
        self.progress = progress
        self.codebooks: torch.Tensor | None = None

    def refit_weights(self, counts: torch.Tensor) -> torch.Tensor | None:
        """Row weights of the final refit: every row alike (None), whatever ``counts``."""
        return None

    def fit(self, weight: torch.Tensor, counts: torch.Tensor) -> CompressedTable:
        """Fit codebooks on a sample, encode all rows: weight [N, D], counts [N] -> table."""
        counts = check_fit_inputs(weight, counts, self.num_subspaces, self.codebook_size)
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed)
        n, dim = weight.shape
        sub_dim = dim // self.num_subspaces
        size = min(self.sample_size, n)
        ids = torch.randperm(n, generator=gen)[:size].sort().values
        x = weight[ids].to(self.device, torch.float32).view(-1, self.num_subspaces, sub_dim)
        seed_rows = torch.randperm(size, generator=gen)[: self.init_size].to(self.device)
        codebooks = kmeans_pp(x[seed_rows], self.codebook_size, gen)
        self.codebooks = lloyd(x, codebooks, self.iters)
        fit_s = time.perf_counter() - t0
        codes = self.encode(weight)
        self.codebooks = refit_codebooks(weight, codes, self.codebooks)
        encode_s = time.perf_counter() - t0 - fit_s
        stats = quality_stats(weight, codes, self.codebooks, counts)
        stats.update(method="pq", fit_seconds=fit_s, encode_seconds=encode_s, sample_rows=size)
        return CompressedTable(codes, self.codebooks.cpu(), stats)

    def encode(self, weight: torch.Tensor) -> torch.Tensor:
        """Nearest-entry codes: weight [n, D] -> codes [n, L] (smallest dtype, CPU)."""
        if self.codebooks is None:
            raise RuntimeError("PQQuantizer.encode called before fit")
        check_weight(weight, self.num_subspaces)
        return encode_rows(weight, self.codebooks, None, self.chunk_rows, self.progress)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Concatenated codebook entries: codes [n, L] -> float32 [n, D]."""
        if self.codebooks is None:
            raise RuntimeError("PQQuantizer.decode called before fit")
        check_codes(codes, self.num_subspaces, self.codebook_size)
        return decode_codes(codes, self.codebooks)
