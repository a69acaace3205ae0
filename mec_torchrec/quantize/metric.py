"""Quantizing in the loss's metric: a row's error weighed by how much it moves the model's loss.

Product quantization minimises ``|x_hat - x|^2``, which treats every direction of an embedding
alike. A trained model does not: to second order, replacing row x by x_hat raises the loss by
about ``(x_hat - x)^T F (x_hat - x)`` per lookup, F being the (empirical) Fisher information of the
loss with respect to the pooled embedding, ``E[g g^T]`` over training samples. On the demo's
learned tables F is far from isotropic (largest eigenvalue ~1,000x the median), so a plain-PQ
codebook spends its entries on directions the model barely reads.

Quantizing in F's metric needs no new storage format when F is taken block-diagonal, one block
per subspace: with ``A_l = F_ll^(1/2)``, fit the quantizer to the rows mapped by ``x_l -> x_l A_l``
(where squared distances are F_ll-distances), then map each codebook entry back with ``A_l^-1``.
Nearest entries, weighted means and exact rows all commute with that linear map, so the result
is an ordinary :class:`CompressedTable` of the original space (codes [N, L], codebooks
[L, K, D / L]) that every layer downstream serves unchanged; only the cross-subspace blocks of F
are left out.

Example::

    collector = FisherCollector(model.sparse_arch, feature_names)   # DLRM: its [B, F, D] output
    with collector:
        for batch in batches:
            logits = model(batch.dense_features, batch.sparse_features).view(-1)
            loss = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="sum")
            collector.accumulate(loss)
    fisher = collector.fisher()["C21"]                               # [D, D]
    metric = SubspaceMetric.from_fisher(fisher, num_subspaces=4)
    table = quantizer.fit(metric.apply(weight), counts)
    table = metric.restore(table, weight, counts)                    # back in weight's space
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Self

import torch
from torch import nn

from mec_torchrec.quantize.exact import reserve_exact_rows
from mec_torchrec.quantize.stats import quality_stats
from mec_torchrec.quantize.table import CompressedTable


class FisherCollector:
    """Sums ``g g^T`` per feature, g being each sample's loss gradient w.r.t. its pooled embedding.

    While active (``with collector:``), a forward hook on ``module`` replaces its output by a
    detached copy that requires grad: :meth:`accumulate` differentiates the loss with respect to
    that copy only, so no parameter gets a ``.grad`` and no fused (in-backward) embedding
    optimizer steps. ``module`` is an embedding collection returning a ``KeyedTensor`` (a plain
    or sharded EBC) or a module returning a [B, F, D] tensor whose features are
    ``feature_names`` in order (torchrec DLRM's ``sparse_arch``, which works the same under
    DistributedModelParallel).

    Args:
        module: the module whose output holds the pooled embeddings.
        feature_names: for a [B, F, D] output, the F feature names in order; for a KeyedTensor
            output, the features to collect (None: all of its keys).
    """

    def __init__(self, module: nn.Module, feature_names: Sequence[str] | None = None) -> None:
        self.module = module
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.sums: dict[str, torch.Tensor] = {}
        self.num_samples = 0
        self._leaf: tuple[torch.Tensor, list[str], list[int]] | None = None
        self._handle: Any = None

    def __enter__(self) -> Self:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        self._handle, self._leaf = None, None

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        from torchrec.distributed.types import Awaitable
        from torchrec.sparse.jagged_tensor import KeyedTensor

        if isinstance(output, Awaitable):  # a sharded collection's LazyAwaitable[KeyedTensor]
            output = output.wait()
        if isinstance(output, KeyedTensor):
            values = output.values().detach().requires_grad_()
            keys, lengths = list(output.keys()), list(output.length_per_key())
            self._leaf = (values, keys, [0, *itertools.accumulate(lengths)])
            return KeyedTensor(keys, lengths, values, key_dim=output.key_dim())
        if isinstance(output, torch.Tensor) and output.dim() == 3:
            if self.feature_names is None or len(self.feature_names) != output.shape[1]:
                raise ValueError(
                    f"{type(module).__name__} returned a [B, F, D] = {list(output.shape)} tensor: "
                    f"give its {output.shape[1]} feature names in order (got "
                    f"{self.feature_names})"
                )
            values = output.detach().requires_grad_()
            self._leaf = (values, self.feature_names, [])
            return values
        raise TypeError(
            f"{type(module).__name__} returned {type(output).__name__}; FisherCollector needs a "
            f"KeyedTensor or a [B, F, D] tensor"
        )

    @torch.no_grad()
    def _add(self, name: str, grads: torch.Tensor) -> None:
        g = grads.detach().to("cpu", torch.float64)
        if name not in self.sums:
            self.sums[name] = torch.zeros(g.shape[1], g.shape[1], dtype=torch.float64)
        self.sums[name] += g.T @ g

    def accumulate(self, loss: torch.Tensor) -> None:
        """Add the batch of the last forward; ``loss`` is the *sum* of its per-sample losses (a
        mean loss times the batch size), so each sample's gradient enters as it is."""
        if self._leaf is None:
            raise RuntimeError("no forward of the hooked module since the last accumulate()")
        values, keys, offsets = self._leaf
        self._leaf = None
        (grad,) = torch.autograd.grad(loss, values)
        for j, name in enumerate(keys):
            if offsets and self.feature_names is not None and name not in self.feature_names:
                continue
            self._add(name, grad[:, offsets[j] : offsets[j + 1]] if offsets else grad[:, j])
        self.num_samples += grad.shape[0]

    def all_reduce(self, group: Any = None) -> None:
        """Sum the matrices and the sample count over the ranks of ``group``, once, after the
        last batch (every rank must have collected the same features)."""
        import torch.distributed as dist

        # NCCL reduces only CUDA tensors; the sums stay on the CPU between batches.
        nccl = dist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        for name in sorted(self.sums):
            total = self.sums[name].to(device)
            dist.all_reduce(total, group=group)
            self.sums[name] = total.cpu()
        count = torch.tensor([self.num_samples], dtype=torch.float64, device=device)
        dist.all_reduce(count, group=group)
        self.num_samples = int(count.item())

    def fisher(self) -> dict[str, torch.Tensor]:
        """``E[g g^T]`` per feature: [D, D] float64 matrices."""
        if self.num_samples == 0:
            raise RuntimeError("no samples collected")
        return {name: s / self.num_samples for name, s in self.sums.items()}


class SubspaceMetric:
    """A block-diagonal metric, one symmetric positive-definite block per subspace.

    ``apply`` maps rows into the metric's coordinates (sub-vector l times ``A_l``), where plain
    squared distances are the metric's; ``restore`` maps a table fitted there back to the original
    space (each codebook entry of subspace l times ``A_l^-1``).

    Args:
        blocks: [L, D / L, D / L], the maps ``A_l`` (symmetric positive definite).
    """

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
            raise ValueError(f"blocks must be [L, d, d], got {list(blocks.shape)}")
        blocks = blocks.to(torch.float64)
        if not torch.isfinite(blocks).all():
            raise ValueError("metric blocks contain NaN or inf")
        self.blocks = blocks
        self.inverse = torch.linalg.inv(blocks)

    @classmethod
    def from_fisher(
        cls,
        fisher: torch.Tensor,
        num_subspaces: int,
        ridge: float = 0.05,
        weight: torch.Tensor | None = None,
    ) -> SubspaceMetric:
        """``A_l = (B_l / mean eigenvalue of B_l + ridge * I)^(1/2)`` from the diagonal blocks
        ``B_l`` of ``fisher`` [D, D]; ``ridge`` > 0 keeps directions the samples never moved (a
        zero eigenvalue) from being ignored altogether. With ``weight`` [N, D], all blocks are
        then scaled by one factor so that ``apply(weight)`` has weight's Frobenius norm: a
        quantizer's step sizes were chosen for the table's own scale."""
        if fisher.dim() != 2 or fisher.shape[0] != fisher.shape[1]:
            raise ValueError(f"fisher must be a square [D, D] matrix, got {list(fisher.shape)}")
        dim = fisher.shape[0]
        if num_subspaces < 1 or dim % num_subspaces:
            raise ValueError(f"D = {dim} is not divisible by L = {num_subspaces}")
        if not (ridge > 0 and math.isfinite(ridge)):
            raise ValueError(f"ridge must be positive and finite, got {ridge}")
        fisher = fisher.to(torch.float64)
        if not torch.isfinite(fisher).all():
            raise ValueError("fisher contains NaN or inf")
        if not torch.allclose(fisher, fisher.T, rtol=1e-6, atol=1e-12 * float(fisher.abs().max())):
            raise ValueError("fisher is not symmetric")
        sub = dim // num_subspaces
        blocks = []
        for l in range(num_subspaces):
            values, vectors = torch.linalg.eigh(
                fisher[l * sub : (l + 1) * sub, l * sub : (l + 1) * sub]
            )
            if float(values.min()) < -1e-8 * float(values.abs().max()):
                raise ValueError(f"fisher's block {l} is not positive semi-definite")
            values = values.clamp_min(0)
            scale = float(values.mean())  # in units of its mean eigenvalue, then the ridge
            values = (values / scale if scale > 0 else values) + ridge
            blocks.append(vectors @ torch.diag(values.sqrt()) @ vectors.T)
        metric = cls(torch.stack(blocks))
        if weight is not None:
            metric._check("weight", weight.shape[-1])
            mapped = float(metric.apply(weight).double().norm())
            if mapped > 0:
                metric = cls(metric.blocks * (float(weight.double().norm()) / mapped))
        return metric

    @property
    def num_subspaces(self) -> int:
        return self.blocks.shape[0]

    @property
    def dim(self) -> int:
        return self.blocks.shape[0] * self.blocks.shape[1]

    def _check(self, what: str, dim: int) -> None:
        if dim != self.dim:
            raise ValueError(f"{what} has D = {dim}; the metric is for D = {self.dim}")

    @torch.no_grad()
    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` [N, D] in the metric's coordinates (float32, on weight's device)."""
        self._check("weight", weight.shape[-1])
        n, sub = weight.shape[0], self.blocks.shape[1]
        blocks = self.blocks.to(weight.device, torch.float32)
        x = weight.to(torch.float32).reshape(n, self.num_subspaces, sub)
        return torch.einsum("nld,lde->nle", x, blocks).reshape(n, self.dim)

    @torch.no_grad()
    def restore(
        self, table: CompressedTable, weight: torch.Tensor, counts: torch.Tensor
    ) -> CompressedTable:
        """``table`` (fitted to ``apply(weight)``) in the original space: codebooks mapped back,
        codes unchanged, quality stats recomputed against ``weight`` itself (the fit's other
        stats kept)."""
        self._check("table", table.dim)
        if table.num_subspaces != self.num_subspaces:
            raise ValueError(
                f"table has L = {table.num_subspaces}; the metric has {self.num_subspaces} blocks"
            )
        inverse = self.inverse.to(table.codebooks.device, torch.float64)
        codebooks = torch.einsum("lkd,lde->lke", table.codebooks.double(), inverse).float()
        stats = {**table.stats, **quality_stats(weight, table.codes, codebooks, counts)}
        return CompressedTable(table.codes, codebooks, stats)


def fit_table(
    quantizer: Any,
    weight: torch.Tensor,
    counts: torch.Tensor,
    *,
    exact_rows: int = 0,
    fisher: torch.Tensor | None = None,
    ridge: float = 0.05,
) -> CompressedTable:
    """``quantizer.fit(weight, counts)`` with the two same-bytes options of the app's stage 2:
    the table fitted in the loss metric of ``fisher`` [D, D] (None: plain squared error; see
    :class:`SubspaceMetric`) and its ``exact_rows`` most frequent rows decoding exactly
    (:func:`reserve_exact_rows`, refitted with the quantizer's own row weights; 0: none)."""
    metric = None
    if fisher is not None:
        metric = SubspaceMetric.from_fisher(fisher, quantizer.num_subspaces, ridge, weight)
    fit_weight = weight if metric is None else metric.apply(weight)
    table = quantizer.fit(fit_weight, counts)
    if exact_rows:
        table = reserve_exact_rows(
            fit_weight, counts, table, exact_rows, quantizer.refit_weights(counts)
        )
    return table if metric is None else metric.restore(table, weight, counts)
