"""reserve_exact_rows: the most frequent rows get codebook entries of their own and decode exactly."""

import pytest
import torch

from mec_torchrec.quantize import (
    CompressedTable,
    MECQuantizer,
    PQQuantizer,
    head_rows,
    reserve_exact_rows,
)

N, D, L, K, H = 600, 8, 2, 16, 4


def _table(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, CompressedTable]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, D, generator=g) * 2
    weight = centres[torch.randint(0, 12, (N,), generator=g)] + 0.3 * torch.randn(N, D, generator=g)
    # Popular ids scattered over the table, not ids 0..H-1.
    counts = (1000 / (torch.arange(N) + 1.0)).long()[torch.randperm(N, generator=g)]
    table = PQQuantizer(L, K, iters=5, seed=seed).fit(weight, counts)
    return weight, counts, table


def test_head_rows_are_the_most_frequent_ids_ties_to_the_lower_id() -> None:
    counts = torch.tensor([3, 9, 9, 0, 5])
    assert head_rows(counts, 3).tolist() == [1, 2, 4]


def test_head_rows_decode_exactly_and_own_their_entries() -> None:
    weight, counts, table = _table()
    codes, codebooks = table.codes.clone(), table.codebooks.clone()
    exact = reserve_exact_rows(weight, counts, table, H)
    assert torch.equal(table.codes, codes) and torch.equal(table.codebooks, codebooks)  # untouched
    head = head_rows(counts, H)
    assert torch.equal(exact.decode(head), weight[head])
    tail = torch.ones(N, dtype=torch.bool)
    tail[head] = False
    for sub in range(L):
        head_codes = exact.codes[head, sub].long()
        assert head_codes.unique().numel() == H  # one entry per head row
        assert not torch.isin(exact.codes[tail, sub].long(), head_codes).any()
    assert (exact.codes.dtype, exact.codebooks.shape) == (table.codes.dtype, table.codebooks.shape)
    assert exact.nbytes == table.nbytes  # no new storage: same codes and codebooks


def test_head_error_drops_and_tail_entries_are_their_rows_means() -> None:
    weight, counts, table = _table()
    exact = reserve_exact_rows(weight, counts, table, H)
    w = counts.double().clamp_min(1)

    def traffic_error(t: CompressedTable) -> float:
        err = (t.decode() - weight).square().sum(1).double()
        return float((err * w).sum() / w.sum())

    assert traffic_error(exact) < traffic_error(table)
    tail = torch.ones(N, dtype=torch.bool)
    tail[head_rows(counts, H)] = False
    for sub in range(L):
        for entry in exact.codes[tail, sub].unique().tolist():
            rows = tail & (exact.codes[:, sub] == entry)
            mean = weight[rows, sub * D // L : (sub + 1) * D // L].mean(0)
            assert torch.allclose(exact.codebooks[sub, entry], mean, atol=1e-5)


def test_refit_weights_weigh_the_tail_means() -> None:
    weight, counts, table = _table()
    w = counts.double().clamp_min(1)
    exact = reserve_exact_rows(weight, counts, table, H, row_weight=w)
    tail = torch.ones(N, dtype=torch.bool)
    tail[head_rows(counts, H)] = False
    entry = int(exact.codes[tail, 0].mode().values)
    rows = tail & (exact.codes[:, 0] == entry)
    sub_rows = weight[rows, : D // L].double()
    mean = (sub_rows * w[rows, None]).sum(0) / w[rows].sum()
    assert torch.allclose(exact.codebooks[0, entry].double(), mean, atol=1e-5)


def test_quality_stats_are_recomputed_for_the_new_codes() -> None:
    weight, counts, table = _table()
    exact = reserve_exact_rows(weight, counts, table, H)
    assert exact.stats["exact_rows"] == H
    assert exact.stats["mse"] == pytest.approx(float((exact.decode() - weight).square().mean()))


def test_mec_quantizer_refit_weights_follow_final_weighting() -> None:
    counts = torch.tensor([0, 1, 8, 100])
    sampled = MECQuantizer(2, 4, use_pwr=False, no_pwr_sampling="count", final_weighting="sampling")
    assert sampled.refit_weights(counts).tolist() == [1.0, 1.0, 8.0, 100.0]
    assert MECQuantizer(2, 4).refit_weights(counts) is None
    assert PQQuantizer(2, 4).refit_weights(counts) is None


@pytest.mark.parametrize("num_rows", [0, K])
def test_exact_rows_outside_zero_to_k_is_an_error(num_rows: int) -> None:
    weight, counts, table = _table()
    with pytest.raises(ValueError, match=r"exact rows must be in \(0, K\) = \(0, 16\)"):
        reserve_exact_rows(weight, counts, table, num_rows)


def test_more_exact_rows_than_the_table_has_is_an_error() -> None:
    table = CompressedTable(torch.zeros(3, L, dtype=torch.uint8), torch.randn(L, K, D // L))
    with pytest.raises(ValueError, match="at most N = 3, got 4"):
        reserve_exact_rows(torch.randn(3, D), torch.ones(3), table, H)


def test_weight_of_another_shape_is_an_error() -> None:
    weight, counts, table = _table()
    with pytest.raises(ValueError, match="do not match the table"):
        reserve_exact_rows(weight[:-1], counts[:-1], table, H)


def test_a_table_of_at_most_h_rows_is_held_exactly() -> None:
    weight = torch.randn(3, D)
    table = CompressedTable(torch.zeros(3, L, dtype=torch.uint8), torch.randn(L, K, D // L))
    exact = reserve_exact_rows(weight, torch.tensor([5, 0, 2]), table, 3)
    assert torch.equal(exact.decode(), weight)
