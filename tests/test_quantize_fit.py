"""MECQuantizer and PQQuantizer end to end on small clustered tables (fast: small N, few epochs)."""

import pytest
import torch

from mec_torchrec.quantize import CompressedTable, MECQuantizer, PQQuantizer

N, D, L, K = 1200, 16, 4, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The CI box is shared; one thread avoids OpenMP spin contention and keeps the file fast.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _table(n: int = N, dim: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, dim, generator=g) * 2
    weight = centres[torch.randint(0, 40, (n,), generator=g)] + 0.5 * torch.randn(
        n, dim, generator=g
    )
    counts = (10_000 / (torch.arange(n) + 1.0) ** 1.1).long()
    return weight, counts


def _mec(**kw) -> MECQuantizer:
    args = {
        "epochs": 2,
        "batch_size": 256,
        "sample_size": 1000,
        "holdout_size": 100,
        "init_size": 500,
        "kmeans_iters": 3,
        "lr": 1e-3,
        "seed": 0,
    }
    args.update(kw)
    return MECQuantizer(L, K, **args)


def _err(table: CompressedTable, weight: torch.Tensor) -> float:
    return float((table.decode() - weight).square().mean())


@pytest.fixture(scope="module")
def fitted() -> tuple[MECQuantizer, CompressedTable, torch.Tensor]:
    weight, counts = _table()
    quantizer = _mec()
    return quantizer, quantizer.fit(weight, counts), weight


def test_fit_returns_table_with_smallest_codes_and_stats(fitted):
    quantizer, table, weight = fitted
    assert table.codes.shape == (N, L) and table.codes.dtype == torch.uint8
    assert table.codebooks.shape == (L, K, D // L)
    assert torch.equal(table.codes, quantizer.encode(weight))
    assert torch.equal(table.decode(), quantizer.decode(table.codes))
    s = table.stats
    assert set(s["buckets"]) == {"head", "torso", "tail"}
    assert [s["buckets"][b]["rows"] for b in ("head", "torso", "tail")] == [12, 228, 960]
    assert len(s["perplexity"]) == L and all(1 <= p <= K for p in s["perplexity"])
    assert s["mse"] == pytest.approx(_err(table, weight), rel=1e-5)
    assert 0 < s["cosine"] <= 1


def test_codes_use_int16_beyond_256_entries():
    weight, counts = _table(n=600, dim=2)
    table = PQQuantizer(1, 300, iters=1, seed=0).fit(weight, counts)
    assert table.codes.dtype == torch.int16
    assert int(table.codes.max()) >= 256


def test_training_lowers_reconstruction_error():
    weight, counts = _table()
    # From raw k-means++ seeds (no Lloyd, no polish): the trained codebooks must reconstruct better.
    untrained = _mec(kmeans_iters=0, epochs=0, polish_iters=0).fit(weight, counts)
    quantizer = _mec(kmeans_iters=0, epochs=4, lr=3e-2, use_contrastive=False, polish_iters=0)
    trained = quantizer.fit(weight, counts)
    assert _err(trained, weight) < 0.95 * _err(untrained, weight)
    heldout = [h["heldout"] for h in quantizer.history]
    assert min(heldout[1:]) < heldout[0]


def test_polish_lowers_error_and_codes_still_come_from_the_encoder():
    weight, counts = _table()
    rough = _mec(polish_iters=0).fit(weight, counts)
    quantizer = _mec(polish_iters=3)
    polished = quantizer.fit(weight, counts)
    assert _err(polished, weight) < _err(rough, weight)
    assert polished.stats["polish_iters"] == 3
    q = quantizer.encoder(weight).view(N, L, D // L)
    from mec_torchrec.quantize.kmeans import nearest

    assert torch.equal(polished.codes.long(), nearest(q, quantizer.assign_codebooks))


def test_polish_on_a_subset_of_the_pool_is_seeded_and_still_lowers_error():
    weight, counts = _table()
    rough = _mec(polish_iters=0).fit(weight, counts)
    first = _mec(polish_iters=5, polish_size=300).fit(weight, counts)
    again = _mec(polish_iters=5, polish_size=300).fit(weight, counts)
    assert torch.equal(first.codes, again.codes) and torch.equal(first.codebooks, again.codebooks)
    assert _err(first, weight) < _err(rough, weight)
    with pytest.raises(ValueError, match="polish_size"):
        MECQuantizer(L, K, polish_size=0)


def test_count_sampling_favours_the_head_over_uniform_sampling():
    weight, counts = _table()
    uniform = _mec(use_pwr=False, polish_iters=0).fit(weight, counts).stats["buckets"]
    count = _mec(use_pwr=False, no_pwr_sampling="count", polish_iters=0).fit(weight, counts)
    assert count.stats["buckets"]["head"]["mse"] < uniform["head"]["mse"]
    with pytest.raises(ValueError, match="no_pwr_sampling"):
        MECQuantizer(L, K, no_pwr_sampling="traffic")


def test_sampling_final_weighting_refits_entries_to_count_weighted_means():
    weight, counts = _table()
    plain = _mec(use_pwr=False, no_pwr_sampling="count", polish_iters=0).fit(weight, counts)
    weighted = _mec(
        use_pwr=False, no_pwr_sampling="count", polish_iters=0, final_weighting="sampling"
    ).fit(weight, counts)
    assert torch.equal(weighted.codes, plain.codes)  # training and codes alike; only the refit
    assert weighted.stats["final_weighting"] == "sampling"
    w = counts.double().clamp_min(1)
    x = weight.view(N, L, D // L).double()
    for sub in range(L):
        c = weighted.codes[:, sub].long()
        sums = torch.zeros(K, D // L, dtype=torch.float64).index_add_(0, c, x[:, sub] * w[:, None])
        mass = torch.zeros(K, dtype=torch.float64).index_add_(0, c, w)
        used = mass > 0
        torch.testing.assert_close(
            weighted.codebooks[sub, used], (sums[used] / mass[used, None]).float()
        )

    def traffic(table: CompressedTable) -> float:
        return float(((table.decode() - weight).square().mean(1).double() * w).sum() / w.sum())

    assert traffic(weighted) < traffic(plain)  # what requests see...
    assert _err(weighted, weight) > _err(plain, weight)  # ...at the cost of the plain mean
    with pytest.raises(ValueError, match="final_weighting"):
        MECQuantizer(L, K, final_weighting="count")


def test_encoder_is_trained_and_codes_come_from_its_output(fitted):
    quantizer, table, weight = fitted
    assert float(quantizer.encoder.out.weight.abs().sum()) > 0  # moved from its zero init
    from mec_torchrec.quantize.kmeans import nearest

    q = quantizer.encoder(weight).view(N, L, D // L)
    assert torch.equal(table.codes.long(), nearest(q, quantizer.assign_codebooks))


def test_mec_reconstructs_about_as_well_as_pq():
    weight, counts = _table()
    pq = PQQuantizer(L, K, iters=10, seed=0).fit(weight, counts)
    mec = _mec(kmeans_iters=10).fit(weight, counts)  # same k-means effort as the baseline
    assert _err(mec, weight) < 1.05 * _err(pq, weight)


def test_seeded_runs_are_identical_and_seeds_matter():
    weight, counts = _table(n=600)
    a = _mec(seed=3).fit(weight, counts)
    b = _mec(seed=3).fit(weight, counts)
    c = _mec(seed=4).fit(weight, counts)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks)
    assert not torch.equal(a.codes, c.codes)


def test_progress_flag_does_not_change_losses_or_codes():
    weight, counts = _table(n=600)
    quiet, loud = _mec(progress=False), _mec(progress=True)
    a, b = quiet.fit(weight, counts), loud.fit(weight, counts)
    assert quiet.history == loud.history
    assert torch.equal(a.codes, b.codes)


def test_chunked_encode_matches_single_pass(fitted):
    quantizer, table, weight = fitted
    quantizer.chunk_rows = 97
    try:
        assert torch.equal(quantizer.encode(weight), table.codes)
    finally:
        quantizer.chunk_rows = 65536


def test_fitted_table_save_load_bit_exact(fitted, tmp_path):
    _, table, _ = fitted
    table.save(tmp_path / "t.safetensors")
    loaded = CompressedTable.load(tmp_path / "t.safetensors")
    assert torch.equal(loaded.codes, table.codes) and loaded.codes.dtype == torch.uint8
    assert torch.equal(loaded.codebooks.view(torch.int32), table.codebooks.view(torch.int32))
    assert loaded.stats == table.stats


def test_works_for_any_dim_and_ablations():
    weight, counts = _table(n=500, dim=24)
    for kw in ({"use_pwr": False}, {"use_contrastive": False}, {"in_batch_negatives": 2}):
        table = MECQuantizer(3, 8, epochs=1, batch_size=128, holdout_size=50, seed=0, **kw).fit(
            weight, counts
        )
        assert table.dim == 24 and table.codes.shape == (500, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_matches_shapes():
    weight, counts = _table()
    table = _mec(device="cuda").fit(weight, counts)
    assert table.codes.shape == (N, L) and table.codes.device.type == "cpu"


def _bad(weight=None, counts=None):
    w, c = _table(n=100)
    return (w if weight is None else weight), (c if counts is None else counts)


@pytest.mark.parametrize("cls", [MECQuantizer, PQQuantizer])
@pytest.mark.parametrize(
    ("args", "inputs", "match"),
    [
        ((L, K), _bad(weight=torch.full((100, D), float("nan"))), r"\[100, 16\] has 1600 NaN/inf"),
        (
            (L, K),
            _bad(weight=torch.ones(100, D).index_fill_(0, torch.tensor([3]), float("inf"))),
            "16 NaN/inf",
        ),
        ((L, K), _bad(counts=torch.ones(99)), r"\[N\] = \[100\].*\(99,\)"),
        ((L, K), _bad(counts=-torch.ones(100)), "100 of 100 are negative"),
        ((3, K), _bad(), "D=16 is not divisible by num_subspaces L=3"),
        ((L, 101), _bad(), "K=101 exceeds the number of rows N=100"),
        ((L, K), _bad(weight=torch.empty(0, D), counts=torch.empty(0)), r"empty: shape \(0, 16\)"),
    ],
)
def test_bad_input_raises_value_error(cls, args, inputs, match):
    with pytest.raises(ValueError, match=match):
        cls(*args).fit(*inputs)


@pytest.mark.parametrize("cls", [MECQuantizer, PQQuantizer])
@pytest.mark.parametrize("k", [0, 2**31])
def test_codebook_size_out_of_code_range_raises(cls, k):
    with pytest.raises(ValueError, match=str(k)):
        cls(L, k)


def test_dead_codes_are_reseeded_and_reported():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(8, D, generator=g)  # 8 distinct rows for 16 entries: >= 8 stay dead
    weight = points[torch.randint(0, 8, (400,), generator=g)]
    quantizer = _mec(epochs=1, use_contrastive=False)
    table = quantizer.fit(weight, torch.ones(400, dtype=torch.long))
    assert quantizer.history[1]["reseeded"] >= 8 * L
    assert all(dead >= 8 for dead in table.stats["dead_codes"])
    assert all(p <= 8.0 + 1e-6 for p in table.stats["perplexity"])
    assert table.stats["mse"] == pytest.approx(0.0, abs=1e-10)
