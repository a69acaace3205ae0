"""Quantizing in the loss's metric: FisherCollector's matrices and SubspaceMetric's round trip."""

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import SparseArch

from mec_torchrec.quantize import (
    CompressedTable,
    FisherCollector,
    PQQuantizer,
    SubspaceMetric,
    fit_table,
    head_rows,
    reserve_exact_rows,
)

N, D, L, K = 800, 8, 2, 16
FEATURES = ["f0", "f1"]
B = 24


def _anisotropic_fisher() -> torch.Tensor:
    """Dims 0 and 5 matter 100x, dims 1-2 are correlated; the rest barely count."""
    g = torch.Generator().manual_seed(1)
    f = torch.diag(torch.tensor([100.0, 4, 4, 1, 1, 100, 1, 1]))
    f[1, 2] = f[2, 1] = 3.5
    noise = torch.randn(D, D, generator=g) * 0.01
    return (f + noise @ noise.T).double()


def _table_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(N, D, generator=g)
    counts = (1000 / (torch.arange(N) + 1.0)).long()[torch.randperm(N, generator=g)]
    return weight, counts


def _fisher_error(table: CompressedTable, weight: torch.Tensor, fisher: torch.Tensor) -> float:
    err = (table.decode() - weight).double()
    return float(torch.einsum("ni,ij,nj->n", err, fisher, err).mean())


def test_fitting_in_the_metric_lowers_the_metric_error_and_keeps_the_format() -> None:
    weight, counts = _table_data()
    fisher = _anisotropic_fisher()
    plain = PQQuantizer(L, K, iters=10, seed=0).fit(weight, counts)
    metric = SubspaceMetric.from_fisher(fisher, L, ridge=0.05, weight=weight)
    fitted = PQQuantizer(L, K, iters=10, seed=0).fit(metric.apply(weight), counts)
    table = metric.restore(fitted, weight, counts)
    assert torch.equal(table.codes, fitted.codes)
    assert (table.codes.dtype, table.codebooks.shape, table.nbytes) == (
        plain.codes.dtype, plain.codebooks.shape, plain.nbytes)  # fmt: skip
    # What it is for: less error where the loss looks, paid for by more plain squared error.
    assert _fisher_error(table, weight, fisher) < 0.8 * _fisher_error(plain, weight, fisher)
    plain_mse = float((plain.decode() - weight).square().mean())
    assert float((table.decode() - weight).square().mean()) > plain_mse
    # Stats describe the table against the original rows, not the mapped ones.
    assert table.stats["mse"] == pytest.approx(float((table.decode() - weight).square().mean()))


def test_restore_maps_each_entry_back_and_apply_keeps_the_table_norm() -> None:
    weight, counts = _table_data(1)
    metric = SubspaceMetric.from_fisher(_anisotropic_fisher(), L, weight=weight)
    mapped = metric.apply(weight)
    assert float(mapped.norm()) == pytest.approx(float(weight.norm()), rel=1e-5)
    # Mapped rows and their restore: apply(restore(t).decode()) == t.decode().
    fitted = PQQuantizer(L, K, iters=3, seed=0).fit(mapped, counts)
    restored = metric.restore(fitted, weight, counts)
    torch.testing.assert_close(
        metric.apply(restored.decode()), fitted.decode(), rtol=1e-4, atol=1e-5
    )
    # An isotropic Fisher with the norm kept is the identity: plain quantization, unchanged.
    identity = SubspaceMetric.from_fisher(torch.eye(D, dtype=torch.float64) * 3, L, weight=weight)
    torch.testing.assert_close(identity.apply(weight), weight, rtol=1e-5, atol=1e-6)


def test_exact_rows_fitted_in_the_metric_stay_exact_in_the_original_space() -> None:
    weight, counts = _table_data(2)
    metric = SubspaceMetric.from_fisher(_anisotropic_fisher(), L, weight=weight)
    mapped = metric.apply(weight)
    fitted = PQQuantizer(L, K, iters=3, seed=0).fit(mapped, counts)
    exact = reserve_exact_rows(mapped, counts, fitted, 4, counts.double())
    table = metric.restore(exact, weight, counts)
    head = head_rows(counts, 4)
    torch.testing.assert_close(table.decode(head), weight[head], rtol=1e-4, atol=1e-5)
    assert table.stats["exact_rows"] == 4


def test_a_direction_no_sample_moved_still_counts_through_the_ridge() -> None:
    fisher = torch.zeros(D, D, dtype=torch.float64)
    fisher[0, 0] = fisher[4, 4] = 1.0  # one direction per subspace, the others never moved
    metric = SubspaceMetric.from_fisher(fisher, L, ridge=0.1)
    singular = torch.linalg.svdvals(metric.blocks)
    assert float(singular.min()) > 0  # invertible: no direction mapped to 0
    # Block 0 in units of its mean eigenvalue: diag(4, 0, 0, 0) + 0.1 I, square-rooted.
    torch.testing.assert_close(metric.blocks[0].diagonal(), torch.tensor([4.1, 0.1, 0.1, 0.1],
                               dtype=torch.float64).sqrt())  # fmt: skip


@pytest.mark.parametrize(
    ("fisher", "subspaces", "ridge", "message"),
    [
        (torch.eye(D)[:4], L, 0.05, "fisher must be a square [D, D] matrix, got [4, 8]"),
        (torch.eye(D), 3, 0.05, "D = 8 is not divisible by L = 3"),
        (torch.eye(D), L, 0.0, "ridge must be positive and finite, got 0.0"),
        (torch.eye(D), L, float("nan"), "ridge must be positive and finite, got nan"),
        (torch.eye(D).index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))),
         L, 0.05, "fisher contains NaN or inf"),
        (torch.eye(D).index_put((torch.tensor([0]), torch.tensor([1])), torch.tensor(0.5)),
         L, 0.05, "fisher is not symmetric"),
        (torch.diag(torch.tensor([1.0, 1, 1, -50, 1, 1, 1, 1])), L, 0.05,
         "fisher's block 0 is not positive semi-definite"),
    ],
)  # fmt: skip
def test_bad_metrics_are_refused(
    fisher: torch.Tensor, subspaces: int, ridge: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SubspaceMetric.from_fisher(fisher, subspaces, ridge)


def test_rows_or_tables_of_another_shape_are_refused() -> None:
    weight, counts = _table_data()
    metric = SubspaceMetric.from_fisher(torch.eye(D), L)
    with pytest.raises(ValueError, match="weight has D = 4; the metric is for D = 8"):
        metric.apply(weight[:, :4])
    four = PQQuantizer(4, K, iters=1, seed=0).fit(weight, counts)
    with pytest.raises(ValueError, match="table has L = 4; the metric has 2 blocks"):
        metric.restore(four, weight, counts)


# -- FisherCollector ---------------------------------------------------------------------------


class _Head(nn.Module):
    """A pooled-embedding module -> a nonlinear head -> per-sample BCE summed over the batch."""

    def __init__(self, sparse: nn.Module, stacked: bool) -> None:
        super().__init__()
        self.sparse, self.stacked = sparse, stacked
        g = torch.Generator().manual_seed(3)
        self.w1 = nn.Parameter(torch.randn(len(FEATURES) * D, 16, generator=g) * 0.3)
        self.w2 = nn.Parameter(torch.randn(16, generator=g) * 0.3)

    def forward(self, kjt: KeyedJaggedTensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.sparse(kjt)
        flat = out.flatten(1) if self.stacked else torch.cat([out[f] for f in FEATURES], dim=1)
        logits = torch.tanh(flat @ self.w1) @ self.w2
        return nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")


def _ebc() -> EmbeddingBagCollection:
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=D, num_embeddings=30,
                                 feature_names=[f]) for f in FEATURES]  # fmt: skip
    return EmbeddingBagCollection(tables=tables)


def _batch(seed: int) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 3, (len(FEATURES) * B,), generator=g)
    values = torch.randint(0, 30, (int(lengths.sum()),), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths)
    return kjt, torch.randint(0, 2, (B,), generator=g).float()


def _per_sample_fisher(ebc: EmbeddingBagCollection, model: _Head, seeds: list[int]) -> dict:
    """The definition, one sample at a time: sum of g g^T, g = d loss_b / d pooled_b."""
    sums = {f: torch.zeros(D, D, dtype=torch.float64) for f in FEATURES}
    for seed in seeds:
        kjt, labels = _batch(seed)
        pooled = ebc(kjt).to_dict()
        for b in range(B):
            rows = {f: pooled[f][b : b + 1].detach().requires_grad_() for f in FEATURES}
            flat = torch.cat([rows[f] for f in FEATURES], dim=1)
            logit = torch.tanh(flat @ model.w1) @ model.w2
            loss = nn.functional.binary_cross_entropy_with_logits(logit, labels[b : b + 1])
            for f, g in zip(FEATURES, torch.autograd.grad(loss, [rows[f] for f in FEATURES])):
                sums[f] += g.double().T @ g.double()
    return {f: s / (B * len(seeds)) for f, s in sums.items()}


@pytest.mark.parametrize("stacked", [False, True], ids=["keyed_tensor", "dlrm_sparse_arch"])
def test_collector_sums_each_samples_gradient_outer_product_and_trains_nothing(
    stacked: bool,
) -> None:
    ebc = _ebc()
    sparse = SparseArch(ebc) if stacked else ebc
    model = _Head(sparse, stacked)
    weights = {k: v.clone() for k, v in ebc.state_dict().items()}
    collector = FisherCollector(sparse, FEATURES)
    with collector:
        for seed in (10, 11):
            collector.accumulate(model(*_batch(seed)))
    want = _per_sample_fisher(ebc, model, [10, 11])
    got = collector.fisher()
    assert collector.num_samples == 2 * B and sorted(got) == FEATURES
    for f in FEATURES:
        torch.testing.assert_close(got[f], want[f], rtol=1e-5, atol=1e-9)
    assert all(
        p.grad is None for p in model.parameters()
    )  # only the hooked output was differentiated
    assert all(torch.equal(v, weights[k]) for k, v in ebc.state_dict().items())
    # Outside the with block the module is as it was: its output is the module's own again.
    assert model(*_batch(10)).requires_grad


def test_collector_keeps_only_the_features_asked_for() -> None:
    ebc = _ebc()
    model = _Head(ebc, stacked=False)
    collector = FisherCollector(ebc, ["f1"])
    with collector:
        collector.accumulate(model(*_batch(10)))
    assert sorted(collector.fisher()) == ["f1"]


def test_collector_misuse_is_reported() -> None:
    ebc = _ebc()
    model = _Head(SparseArch(ebc), stacked=True)
    collector = FisherCollector(model.sparse, ["f0"])  # the output has 2 features
    with collector, pytest.raises(ValueError, match=r"give its 2 feature names in order"):
        model(*_batch(10))
    with pytest.raises(RuntimeError, match="no forward of the hooked module"):
        FisherCollector(ebc).accumulate(torch.zeros((), requires_grad=True))
    with pytest.raises(RuntimeError, match="no samples collected"):
        FisherCollector(ebc).fisher()
    linear = nn.Linear(2, 2)
    with FisherCollector(linear), pytest.raises(TypeError, match="needs a KeyedTensor"):
        linear(torch.zeros(3, 2))


def test_fit_table_is_the_metric_fit_then_the_exact_rows_then_the_way_back() -> None:
    weight, counts = _table_data(3)
    fisher = _anisotropic_fisher()
    table = fit_table(PQQuantizer(L, K, iters=3, seed=0), weight, counts, exact_rows=4,
                      fisher=fisher, ridge=0.1)  # fmt: skip
    metric = SubspaceMetric.from_fisher(fisher, L, ridge=0.1, weight=weight)
    mapped = metric.apply(weight)
    by_hand = PQQuantizer(L, K, iters=3, seed=0).fit(mapped, counts)
    by_hand = metric.restore(reserve_exact_rows(mapped, counts, by_hand, 4), weight, counts)
    assert torch.equal(table.codes, by_hand.codes)
    torch.testing.assert_close(table.codebooks, by_hand.codebooks)
    plain = fit_table(PQQuantizer(L, K, iters=3, seed=0), weight, counts)
    assert torch.equal(plain.codes, PQQuantizer(L, K, iters=3, seed=0).fit(weight, counts).codes)
