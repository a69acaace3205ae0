"""MECQuantizer: popularity-weighted, contrastive product quantization with a trained encoder."""

import copy
import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from mec_torchrec.quantize.checks import check_codes, check_config, check_fit_inputs, check_weight
from mec_torchrec.quantize.encoder import ResidualEncoder
from mec_torchrec.quantize.kmeans import kmeans_pp, lloyd, nearest
from mec_torchrec.quantize.losses import (
    contrastive_loss,
    make_negatives,
    normalized_dists,
    quantize_ste,
    usage_kl,
)
from mec_torchrec.quantize.sampling import draw_rows, pwr_weights, split_holdout
from mec_torchrec.quantize.stats import quality_stats
from mec_torchrec.quantize.streaming import encode_rows, refit_codebooks
from mec_torchrec.quantize.table import CompressedTable, decode_codes


class MECQuantizer:
    """MEC product quantizer (arXiv 2502.15355), with the reference code's flaws fixed.

    **Design.** Codebooks live in the original space. A residual encoder (``ResidualEncoder``,
    q = x + MLP(x), zero-initialised correction) produces the query q [N, D]; each of its L
    sub-vectors is assigned to the nearest entry of its codebook (``assign_codebooks`` [L, K, D/L]).
    Training (VQ-VAE style) minimises, on PWR-weighted batches:

    - reconstruction ``|C[codes] - x|^2`` with a straight-through estimator, so the gradient
      reaches both the selected entries and the encoder;
    - commitment ``commitment_weight * |q - sg(C[codes])|^2``;
    - uniform usage ``reg_weight * KL(mean softmax(-dist / temperature) || uniform)`` per codebook
      (differentiable soft assignment), plus re-seeding of entries unused for a whole epoch from
      the highest-error rows;
    - contrastive ``contrastive_weight * InfoNCE`` against, per row, the positive tuple with one
      random subspace replaced by a different random code (and optional in-batch negatives).

    Distances in the soft assignment and InfoNCE are divided by ``d * var`` (var = per-dim
    variance of the data), so ``temperature`` is scale-free. Codebooks start from k-means++ and
    weighted Lloyd iterations, the encoder from the identity: epoch 0 *is* plain PQ.
    Early stopping watches the held-out rows' weighted reconstruction error plus the usage term
    (never the training loss) and restores the best state.

    After training, ``polish_iters`` Lloyd iterations (unweighted by default, see
    ``final_weighting``) on the encoder outputs of the fit pool (a uniform sample of the table, at
    most ``polish_size`` rows) refine ``assign_codebooks``: training weights rows by popularity,
    while the table's reconstruction error weighs every row once, and these steps move the
    entries toward that objective without changing how codes are made (still the nearest entry
    of the encoder output). The default 3 keeps most of PWR's effect (lower tail error than
    count sampling); on tables a model learned, whose head rows sit far from a dense tail, ~25
    reach plain k-means PQ's error (3 leave it 0.7-1.5 % above, 25 give -0.25 to +0.4 %) but
    also erase PWR's tail advantage (docs/benchmarks.md, Quantizer). Then ``encode`` gives the nearest ``assign_codebooks`` entry of
    the encoder output for every row (one streaming pass), and each entry of the served
    ``codebooks`` is refitted to the mean of the original sub-vectors assigned to it, which for
    those codes minimises the reconstruction error of ``decode`` in the original space (what
    stage 3 warm-starts from). With ``final_weighting="sampling"`` the polish and the refit weigh
    each row as the training draws did, so the served entries minimise the training objective's
    weighted error instead of the plain one (with count sampling: the id traffic's error, 25-42 %
    lower on the demo's learned tables than the unweighted refit, docs/benchmarks.md).

    **PWR.** With ``use_pwr`` rows are drawn with probability proportional to
    floor(log2(counts[j])) (1 when the count is below 2), as indices with replacement from the
    fit pool (a uniform subset of at most ``sample_size`` rows, each held once), and the usage
    regulariser is on. ``use_pwr=False`` drops the usage term and draws rows as
    ``no_pwr_sampling`` says: ``"uniform"`` (every row alike) or ``"count"`` (in proportion to
    its training count, i.e. the id traffic, which is what PWR's log damping is meant to beat).

    Args:
        num_subspaces: L, sub-vectors per row (D % L == 0).
        codebook_size: K, entries per codebook (codes are uint8 for K <= 256, int16, int32).
        reg_weight: weight of the uniform-usage KL term (0 turns it off).
        contrastive_weight: weight of the InfoNCE term.
        temperature: softmax temperature of soft assignment and InfoNCE (normalised distances).
        commitment_weight: weight of the commitment term (keeps q near its entries).
        epochs: maximum passes; one epoch draws as many rows as the fit pool holds.
        batch_size: rows per optimiser step.
        lr: Adam learning rate (encoder and codebooks).
        patience: epochs without held-out improvement before stopping.
        sample_size: rows in the fit pool (uniform subset of the table; all rows if fewer).
        use_pwr: popularity-weighted sampling + usage regulariser (see above).
        no_pwr_sampling: row sampling when ``use_pwr`` is False: "uniform" or "count".
        use_contrastive: add the contrastive term.
        seed: seeds every random draw (CPU ``torch.Generator``); equal seeds give identical codes
            on the CPU (on CUDA, atomics in the backward pass can differ in the last bits).
        device: where training and encoding run; ``weight`` may stay on the CPU.
        progress: tqdm bars for epochs and encoding; never changes the result.
        hidden_dim: encoder hidden width (default D).
        in_batch_negatives: extra in-batch negatives per row for InfoNCE (0 = only the
            one-subspace negative).
        kmeans_iters: weighted Lloyd iterations for the initial codebooks.
        init_size: pool rows (PWR-weighted) for k-means++ seeding and the Lloyd iterations.
        holdout_size: held-out rows for early stopping (at most N / 10).
        chunk_rows: rows per chunk in the streaming encode pass.
        polish_iters: Lloyd iterations on the pool's encoder outputs after training (0 keeps
            the trained ``assign_codebooks`` as they are).
        polish_size: pool rows the polish runs on (a uniform subset when the pool is larger).
        final_weighting: how the polish and the final refit weigh rows: ``"uniform"`` (every
            row once: the table's plain reconstruction error) or ``"sampling"`` (by the weights
            the training drew rows with: PWR, counts or uniform). With count sampling,
            ``"sampling"`` minimises the count-weighted error, i.e. the error requests see.
    """

    def __init__(
        self,
        num_subspaces: int,
        codebook_size: int,
        *,
        reg_weight: float = 0.1,
        contrastive_weight: float = 0.01,
        temperature: float = 0.1,
        commitment_weight: float = 1.0,
        epochs: int = 10,
        batch_size: int = 8192,
        lr: float = 1e-4,
        patience: int = 3,
        sample_size: int = 1_000_000,
        use_pwr: bool = True,
        no_pwr_sampling: str = "uniform",
        use_contrastive: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        progress: bool = False,
        hidden_dim: int | None = None,
        in_batch_negatives: int = 0,
        kmeans_iters: int = 10,
        init_size: int = 65536,
        holdout_size: int = 10_000,
        chunk_rows: int = 65536,
        polish_iters: int = 3,
        polish_size: int = 262_144,
        final_weighting: str = "uniform",
    ) -> None:
        check_config(num_subspaces, codebook_size)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if (
            batch_size < 1 or epochs < 0 or patience < 1 or sample_size < 1 or polish_iters < 0
            or polish_size < 1
        ):
            raise ValueError(
                f"need batch_size >= 1, epochs >= 0, patience >= 1, sample_size >= 1, "
                f"polish_iters >= 0, polish_size >= 1; got {batch_size}, {epochs}, {patience}, "
                f"{sample_size}, {polish_iters}, {polish_size}"
            )
        self.num_subspaces, self.codebook_size = num_subspaces, codebook_size
        self.reg_weight, self.contrastive_weight = reg_weight, contrastive_weight
        self.temperature, self.commitment_weight = temperature, commitment_weight
        self.epochs, self.batch_size, self.lr, self.patience = epochs, batch_size, lr, patience
        self.sample_size, self.use_pwr, self.use_contrastive = sample_size, use_pwr, use_contrastive
        self.seed, self.device, self.progress = seed, torch.device(device), progress
        self.hidden_dim, self.in_batch_negatives = hidden_dim, in_batch_negatives
        self.kmeans_iters, self.init_size = kmeans_iters, init_size
        self.holdout_size, self.chunk_rows = holdout_size, chunk_rows
        self.polish_iters, self.polish_size = polish_iters, polish_size
        if no_pwr_sampling not in ("uniform", "count"):
            raise ValueError(
                f"no_pwr_sampling must be 'uniform' or 'count', got {no_pwr_sampling!r}"
            )
        self.no_pwr_sampling = no_pwr_sampling
        if final_weighting not in ("uniform", "sampling"):
            raise ValueError(
                f"final_weighting must be 'uniform' or 'sampling', got {final_weighting!r}"
            )
        self.final_weighting = final_weighting
        self.encoder: ResidualEncoder | None = None
        self.assign_codebooks: torch.Tensor | None = None
        self.codebooks: torch.Tensor | None = None
        self.history: list[dict[str, float]] = []

    # -- training -------------------------------------------------------------------------

    def _losses(
        self, x: torch.Tensor, codebooks: torch.Tensor, var: float, gen: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        """Loss terms on a batch x [B, D]; ``gen`` None skips the (random) contrastive term."""
        L, d = self.num_subspaces, x.shape[1] // self.num_subspaces
        q = self.encoder(x).view(-1, L, d)
        dist = normalized_dists(q, codebooks, var)
        codes = dist.detach().argmin(-1).T  # [B, L]
        x_hat = quantize_ste(q, codebooks, codes)
        picked = x_hat.detach()
        terms = {
            "recon": (x_hat - x.view(-1, L, d)).square().mean() / var,
            "commit": (q - picked).square().mean() / var,
            "usage_kl": usage_kl(dist, self.temperature),
            "codes": codes,
        }
        if gen is not None and self.use_contrastive and self.codebook_size > 1:
            neg, sub = make_negatives(codes, self.codebook_size, gen)
            terms["contrastive"] = contrastive_loss(
                dist, codes, neg, sub, self.temperature, self.in_batch_negatives, gen
            )
        return terms

    def _total(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        total = t["recon"] + self.commitment_weight * t["commit"]
        if self.use_pwr and self.reg_weight:
            total = total + self.reg_weight * t["usage_kl"]
        if "contrastive" in t:
            total = total + self.contrastive_weight * t["contrastive"]
        return total

    @torch.no_grad()
    def _heldout_score(
        self, x: torch.Tensor, w: torch.Tensor, codebooks: torch.Tensor, var: float
    ) -> float:
        """Weighted held-out reconstruction error (+ usage term): the early-stopping criterion."""
        L, d = self.num_subspaces, x.shape[1] // self.num_subspaces
        q = self.encoder(x).view(-1, L, d)
        dist = normalized_dists(q, codebooks, var)
        codes = dist.argmin(-1).T
        err = (decode_codes(codes, codebooks) - x).square().mean(-1) / var
        score = float((err * w).sum() / w.sum())
        if self.use_pwr and self.reg_weight:
            score += self.reg_weight * float(usage_kl(dist, self.temperature))
        return score

    @torch.no_grad()
    def _reseed_dead(
        self,
        usage: torch.Tensor,
        pool: torch.Tensor,
        codebooks: torch.Tensor,
        opt: torch.optim.Optimizer,
        gen: torch.Generator,
    ) -> int:
        """Move entries unused over the epoch onto the sub-vectors with the largest error."""
        dead = usage == 0  # [L, K]
        if not bool(dead.any()):
            return 0
        L, d = self.num_subspaces, pool.shape[1] // self.num_subspaces
        probe = pool[torch.randperm(pool.shape[0], generator=gen)[:16384].to(pool.device)]
        xs = probe.view(-1, L, d)
        codes = nearest(self.encoder(probe).view(-1, L, d), codebooks)
        err = (decode_codes(codes, codebooks).view(-1, L, d) - xs).square().sum(-1)  # [n, L]
        state = opt.state.get(codebooks, {})
        for sub in range(L):
            idx = dead[sub].nonzero().squeeze(1)
            top = err[:, sub].topk(min(len(idx), err.shape[0])).indices
            idx = idx[: len(top)]
            codebooks[sub, idx] = xs[top, sub]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][sub, idx] = 0
        return int(dead.sum())

    def sampling_weights(self, counts: torch.Tensor) -> torch.Tensor:
        """How training draws row j, by ``counts`` [N]: PWR, counts (unseen rows: 1) or 1 each."""
        if self.use_pwr:
            return pwr_weights(counts)
        if self.no_pwr_sampling == "count":
            return counts.to(device="cpu", dtype=torch.float64).clamp_min(1)
        return torch.ones(counts.shape[0], dtype=torch.float64)

    def refit_weights(self, counts: torch.Tensor) -> torch.Tensor | None:
        """Row weights of the final refit (None: every row alike), for a later refit such as
        :func:`~mec_torchrec.quantize.reserve_exact_rows` to minimise the same error."""
        return self.sampling_weights(counts) if self.final_weighting == "sampling" else None

    def fit(self, weight: torch.Tensor, counts: torch.Tensor) -> CompressedTable:
        """Train on a PWR-weighted sample, encode every row: weight [N, D], counts [N] -> table.

        ``counts[j]`` is the training-split occurrence count of row j.
        """
        counts = check_fit_inputs(weight, counts, self.num_subspaces, self.codebook_size)
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed)
        n, dim = weight.shape
        L, d, dev = self.num_subspaces, dim // self.num_subspaces, self.device
        row_w = self.sampling_weights(counts)
        train_ids, held_ids = split_holdout(n, self.holdout_size, gen)
        if train_ids.shape[0] > self.sample_size:
            pick = torch.randperm(train_ids.shape[0], generator=gen)[: self.sample_size]
            train_ids = train_ids[pick.sort().values]
        pool = weight[train_ids].to(dev, torch.float32)
        pool_w = row_w[train_ids]
        held = weight[held_ids].to(dev, torch.float32)
        held_w = row_w[held_ids].to(dev, torch.float32)
        var = float(pool.var(0).mean().clamp_min(1e-12))
        self.encoder = ResidualEncoder(
            dim, self.hidden_dim or dim, pool.mean(0), math.sqrt(var), gen
        ).to(dev)

        # k-means on a uniform subset of the pool, each row weighted by its exact PWR weight
        # (weighting by multiplicities of a weighted draw adds sampling noise to the centroids).
        init_ids = torch.randperm(pool.shape[0], generator=gen)[: self.init_size].sort().values
        init_x = pool[init_ids.to(dev)].view(-1, L, d)
        mult = pool_w[init_ids]
        init = kmeans_pp(init_x, min(self.codebook_size, init_x.shape[0]), gen)
        if init.shape[1] < self.codebook_size:  # fewer distinct rows than K: pad from the pool
            extra = torch.randint(
                pool.shape[0], (self.codebook_size - init.shape[1],), generator=gen
            )
            init = torch.cat([init, pool[extra.to(dev)].view(-1, L, d).transpose(0, 1)], dim=1)
        init = lloyd(init_x, init, self.kmeans_iters, mult.to(dev))
        codebooks = torch.nn.Parameter(init)
        opt = torch.optim.Adam([*self.encoder.parameters(), codebooks], lr=self.lr)

        best = self._heldout_score(held, held_w, codebooks, var) if len(held_ids) else 0.0
        best_state = (copy.deepcopy(self.encoder.state_dict()), codebooks.detach().clone())
        self.history, stale, best_epoch = [{"epoch": 0, "heldout": best}], 0, 0
        bar = tqdm(
            range(1, self.epochs + 1), desc="mec fit", unit="epoch", disable=not self.progress
        )
        for epoch in bar:
            order = draw_rows(pool_w, pool.shape[0], gen)
            usage = torch.zeros(L, self.codebook_size, dtype=torch.long, device=dev)
            sums: dict[str, float] = {}
            for start in range(0, order.shape[0], self.batch_size):
                x = pool[order[start : start + self.batch_size].to(dev)]
                terms = self._losses(x, codebooks, var, gen)
                loss = self._total(terms)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                codes = terms.pop("codes")
                usage += torch.nn.functional.one_hot(codes, self.codebook_size).sum(0)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * x.shape[0]
            record: dict[str, float] = {"epoch": epoch}
            record.update({k: v / order.shape[0] for k, v in sums.items()})
            record["reseeded"] = self._reseed_dead(usage, pool, codebooks, opt, gen)
            record["heldout"] = (
                self._heldout_score(held, held_w, codebooks, var) if len(held_ids) else 0.0
            )
            self.history.append(record)
            bar.set_postfix(heldout=f"{record['heldout']:.4f}", recon=f"{record['recon']:.4f}")
            if not len(held_ids) or record["heldout"] < best:
                best, stale, best_epoch = record["heldout"], 0, epoch
                best_state = (copy.deepcopy(self.encoder.state_dict()), codebooks.detach().clone())
            else:
                stale += 1
                if stale >= self.patience:
                    break
        bar.close()
        self.encoder.load_state_dict(best_state[0])
        self.encoder.eval().requires_grad_(False)
        final_w = row_w if self.final_weighting == "sampling" else None
        polish_x, polish_w = pool, pool_w
        if pool.shape[0] > self.polish_size:
            ids = torch.randperm(pool.shape[0], generator=gen)[: self.polish_size].sort().values
            polish_x, polish_w = pool[ids.to(dev)], pool_w[ids]
        self.assign_codebooks = self._polish(
            polish_x, best_state[1], None if final_w is None else polish_w.to(dev)
        )
        fit_s = time.perf_counter() - t0

        codes = self.encode(weight)
        self.codebooks = refit_codebooks(weight, codes, self.assign_codebooks, row_weight=final_w)
        encode_s = time.perf_counter() - t0 - fit_s
        stats: dict[str, Any] = quality_stats(weight, codes, self.codebooks, counts)
        stats.update(
            method="mec",
            fit_seconds=fit_s,
            encode_seconds=encode_s,
            sample_rows=pool.shape[0],
            heldout_rows=len(held_ids),
            best_epoch=best_epoch,
            polish_iters=self.polish_iters,
            final_weighting=self.final_weighting,
            history=self.history,
        )
        return CompressedTable(codes, self.codebooks.cpu(), stats)

    @torch.no_grad()
    def _polish(
        self, pool: torch.Tensor, codebooks: torch.Tensor, pool_w: torch.Tensor | None
    ) -> torch.Tensor:
        """``polish_iters`` Lloyd iterations on the encoder outputs of ``pool`` (rows weighted by
        ``pool_w``, or alike when None)."""
        if not self.polish_iters:
            return codebooks
        L = self.num_subspaces
        q = torch.cat(
            [
                self.encoder(pool[s : s + self.chunk_rows])
                for s in range(0, len(pool), self.chunk_rows)
            ]
        )
        return lloyd(q.view(q.shape[0], L, -1), codebooks, self.polish_iters, pool_w)

    # -- inference ------------------------------------------------------------------------

    def encode(self, weight: torch.Tensor) -> torch.Tensor:
        """Codes of the trained encoder's output: weight [n, D] -> codes [n, L] (smallest dtype)."""
        if self.encoder is None or self.assign_codebooks is None:
            raise RuntimeError("MECQuantizer.encode called before fit")
        check_weight(weight, self.num_subspaces)
        return encode_rows(
            weight, self.assign_codebooks, self.encoder, self.chunk_rows, self.progress
        )

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Served rows: concatenated (refitted) codebook entries, codes [n, L] -> [n, D]."""
        if self.codebooks is None:
            raise RuntimeError("MECQuantizer.decode called before fit")
        check_codes(codes, self.num_subspaces, self.codebook_size)
        return decode_codes(codes, self.codebooks)
