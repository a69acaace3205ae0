"""MEC's loss terms and sampling: each reference-code flaw listed in MEC.md is shown absent."""

import pytest
import torch

from mec_torchrec.quantize.encoder import ResidualEncoder
from mec_torchrec.quantize.losses import (
    contrastive_loss,
    make_negatives,
    normalized_dists,
    quantize_ste,
    usage_kl,
)
from mec_torchrec.quantize.sampling import draw_rows, pwr_weights

L, K, D = 4, 16, 16


def _setup(batch: int = 64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, D, generator=g)
    enc = ResidualEncoder(D, D, x.mean(0), 1.0, g)
    with torch.no_grad():  # a non-identity encoder, so every parameter is on the gradient path
        enc.out.weight.normal_(0, 0.1, generator=g)
    codebooks = torch.nn.Parameter(torch.randn(L, K, D // L, generator=g))
    q = enc(x).view(batch, L, D // L)
    dist = normalized_dists(q, codebooks, 1.0)
    return g, x, enc, codebooks, q, dist, dist.detach().argmin(-1).T


def _grad_norms(loss, enc, codebooks):
    loss.backward()
    return [float(p.grad.abs().sum()) for p in enc.parameters()], float(codebooks.grad.abs().sum())


def test_straight_through_gradient_reaches_encoder_and_codebooks():
    _, x, enc, codebooks, q, _, codes = _setup()
    x_hat = quantize_ste(q, codebooks, codes)
    assert torch.equal(x_hat.detach(), codebooks.detach()[torch.arange(L), codes])
    enc_grads, cb_grad = _grad_norms((x_hat - x.view_as(x_hat)).square().mean(), enc, codebooks)
    assert all(g > 0 for g in enc_grads)
    assert cb_grad > 0


def test_usage_regularizer_has_gradient_and_is_zero_at_uniform():
    _, _, enc, codebooks, _, dist, _ = _setup()
    enc_grads, cb_grad = _grad_norms(usage_kl(dist, 0.5), enc, codebooks)
    assert all(g > 0 for g in enc_grads)
    assert cb_grad > 0
    assert float(usage_kl(torch.zeros(L, 8, K), 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_negatives_differ_in_exactly_one_subspace_per_row():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, K, (512, L), generator=g)
    neg, sub = make_negatives(codes, K, g)
    differs = neg != codes
    assert torch.equal(differs.sum(1), torch.ones(512, dtype=torch.long))
    assert torch.equal(differs.float().argmax(1), sub)
    assert bool(((neg >= 0) & (neg < K)).all())
    # per row, not one tuple per batch: both the subspace and the new code vary across rows
    assert len(sub.unique()) == L
    assert len(neg[torch.arange(512), sub].unique()) == K
    assert len(torch.unique(neg - codes, dim=0)) > 100


def test_negatives_work_for_two_codes():
    codes = torch.zeros(100, 3, dtype=torch.long)
    neg, _ = make_negatives(codes, 2, torch.Generator().manual_seed(0))
    assert torch.equal(neg.sum(1), torch.ones(100, dtype=torch.long))


def test_contrastive_loss_has_gradient_and_prefers_positive():
    g, _, enc, codebooks, _, dist, codes = _setup()
    neg, sub = make_negatives(codes, K, g)
    loss = contrastive_loss(dist, codes, neg, sub, 0.5, in_batch_negatives=3, generator=g)
    assert 0 < float(loss.detach()) < float(torch.log(torch.tensor(5.0)))  # positive wins
    enc_grads, cb_grad = _grad_norms(loss, enc, codebooks)
    assert all(gr > 0 for gr in enc_grads)
    assert cb_grad > 0


def test_pwr_weights_are_floor_log2_counts():
    counts = torch.tensor([0, 1, 2, 3, 4, 7, 8, 1023, 1024, 2**40 - 1, 2**40])
    expected = [1, 1, 1, 1, 2, 2, 3, 9, 10, 39, 40]
    assert pwr_weights(counts).tolist() == expected


def test_pwr_sampling_follows_row_counts_without_offset():
    counts = torch.ones(100, dtype=torch.long)
    counts[5] = 2**20  # weight 20 for row 5 only: an off-by-one would move it to row 4 or 6
    draws = draw_rows(pwr_weights(counts), 200_000, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=100).double() / 200_000
    assert freq[5] == pytest.approx(20 / 119, rel=0.03)
    others = torch.cat([freq[:5], freq[6:]])
    assert float((others - 1 / 119).abs().max()) < 0.25 / 119 * 4
    assert float(freq[4]) < 2 / 119 and float(freq[6]) < 2 / 119
