"""Hashing-trick and quotient-remainder collections, their byte counts, and TorchRec PTQ bytes."""

import math

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.models.dlrm import DLRM

from mec_torchrec.baselines import (
    HashedEmbeddingBagCollection,
    QREmbeddingBagCollection,
    hash_buckets,
    qr_remainder,
    quantize_ebc,
    stored_bytes,
)


def tables(pooling: PoolingType = PoolingType.SUM) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=1000,
                           feature_names=["f"], pooling=pooling),
        EmbeddingBagConfig(name="small", embedding_dim=4, num_embeddings=10,
                           feature_names=["g"], pooling=pooling),
    ]


def batch() -> KeyedJaggedTensor:
    #        i = 0      i = 1   i = 2  (keys deliberately not in table order)
    # "g"    [1]        []      [2, 3]
    # "f"    [999, 5]   [7]     []
    return KeyedJaggedTensor(keys=["g", "f"], values=torch.tensor([1, 2, 3, 999, 5, 7]),
                             lengths=torch.tensor([1, 0, 2, 2, 1, 0]))


def test_hashed_output_has_the_ebc_layout():
    ebc = EmbeddingBagCollection(tables=tables())
    hashed = HashedEmbeddingBagCollection(tables(), {"big": 50})
    out, ref = hashed(batch()), ebc(batch())
    assert out.keys() == ref.keys() == ["f", "g"]
    assert out.length_per_key() == ref.length_per_key() == [8, 4]
    assert out.values().shape == ref.values().shape == (3, 12)


def test_unhashed_tables_equal_an_ebc_with_the_same_weights():
    ebc = EmbeddingBagCollection(tables=tables(PoolingType.MEAN))
    hashed = HashedEmbeddingBagCollection(tables(PoolingType.MEAN), {})
    with torch.no_grad():
        for name, bag in ebc.embedding_bags.items():
            hashed.weights[name].copy_(bag.weight)
    torch.testing.assert_close(hashed(batch()).values(), ebc(batch()).values())


def test_hashed_bag_is_the_pooled_hashed_rows():
    hashed = HashedEmbeddingBagCollection(tables(), {"big": 50}, seed=3)
    rows = hashed.rows_of("big", torch.tensor([999, 5, 7]))
    assert int(rows.min()) >= 0 and int(rows.max()) < 50
    w = hashed.weights["big"]
    f = hashed(batch())["f"]
    torch.testing.assert_close(f[0], w[rows[0]] + w[rows[1]])
    torch.testing.assert_close(f[1], w[rows[2]])
    torch.testing.assert_close(f[2], torch.zeros(8))


def test_hash_spreads_ids_over_all_buckets():
    hashed = HashedEmbeddingBagCollection(tables(), {"big": 50})
    used = hashed.rows_of("big", torch.arange(1000)).unique().numel()
    assert used == 50


def test_hashed_bytes_count_only_the_buckets():
    b = HashedEmbeddingBagCollection(tables(), {"big": 50}).embedding_bytes()
    assert b["big"].full == 1000 * 8 * 4 and b["big"].stored == 50 * 8 * 4
    assert b["small"].stored == b["small"].full == 10 * 4 * 4


def test_hashed_gradient_reaches_only_the_rows_read():
    hashed = HashedEmbeddingBagCollection(tables(), {"big": 50})
    hashed(batch()).values().sum().backward()
    grad = hashed.weights["big"].grad
    read = hashed.rows_of("big", torch.tensor([999, 5, 7])).unique()
    assert set(grad.abs().sum(1).nonzero().squeeze(1).tolist()) == set(read.tolist())
    assert hashed.weights["small"].grad.abs().sum(1).nonzero().squeeze(1).tolist() == [1, 2, 3]


def test_qr_row_is_quotient_times_remainder():
    qr = QREmbeddingBagCollection(tables(), {"big": 40})
    assert qr.quotient["big"].shape == (25, 8) and qr.remainder["big"].shape == (40, 8)
    f = qr(batch())["f"]
    q, r = qr.quotient["big"], qr.remainder["big"]
    torch.testing.assert_close(f[0], q[999 // 40] * r[999 % 40] + q[0] * r[5])
    torch.testing.assert_close(f[1], q[0] * r[7])


def test_qr_gives_every_id_its_own_pair():
    qr = QREmbeddingBagCollection(tables(), {"big": 40})
    ids = torch.arange(1000)
    rows = qr.rows("big", ids)
    assert torch.unique(rows, dim=0).shape[0] == 1000


def test_qr_mean_pooling_and_layout():
    qr = QREmbeddingBagCollection(tables(PoolingType.MEAN), {"big": 40})
    out = qr(batch())
    assert out.keys() == ["f", "g"] and out.values().shape == (3, 12)
    expected = (qr.rows("big", torch.tensor([999])) + qr.rows("big", torch.tensor([5]))) / 2
    torch.testing.assert_close(out["f"][0], expected[0])
    torch.testing.assert_close(out["g"][2], qr.full["small"][[2, 3]].mean(0))


def test_qr_bytes_and_gradients():
    qr = QREmbeddingBagCollection(tables(), {"big": 40})
    b = qr.embedding_bytes()
    assert b["big"].stored == (25 + 40) * 8 * 4 and b["small"].stored == 10 * 4 * 4
    qr(batch()).values().sum().backward()
    assert qr.quotient["big"].grad[0].abs().sum() > 0
    assert qr.remainder["big"].grad[[39, 5, 7]].abs().sum(1).min() > 0
    assert qr.remainder["big"].grad[0].abs().sum() == 0


@pytest.mark.parametrize("make", [
    lambda: HashedEmbeddingBagCollection(tables(), {"big": 50}),
    lambda: QREmbeddingBagCollection(tables(), {"big": 40}),
])
def test_out_of_range_id_is_an_error(make):
    kjt = KeyedJaggedTensor(keys=["f", "g"], values=torch.tensor([1000, 1]),
                            lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="feature 'f': id 1000 out of range"):
        make()(kjt)


def test_dlrm_trains_with_a_hashed_collection():
    t = [EmbeddingBagConfig(name=n, embedding_dim=8, num_embeddings=1000, feature_names=[f])
         for n, f in (("big", "f"), ("other", "g"))]
    dlrm = DLRM(HashedEmbeddingBagCollection(t, {"big": 50}), dense_in_features=3,
                dense_arch_layer_sizes=[8], over_arch_layer_sizes=[4, 1])
    kjt = KeyedJaggedTensor(keys=["f", "g"], values=torch.tensor([1, 2, 3, 4]),
                            lengths=torch.tensor([1, 1, 1, 1]))
    dlrm(torch.randn(2, 3), kjt).sum().backward()
    assert dlrm.sparse_arch.embedding_bag_collection.weights["big"].grad is not None


def test_budget_sizes_fit_the_bytes():
    assert hash_buckets(50 * 8 * 4 + 31, 8) == 50
    budget = 200 * 8 * 4
    m = qr_remainder(1000, budget, 8)
    assert math.ceil(1000 / m) + m <= 200 < math.ceil(1000 / (m + 1)) + m + 1


def test_ptq_bytes_are_fbgemm_rows_with_scale_bias_and_padding():
    t = [EmbeddingBagConfig(name="t", embedding_dim=64, num_embeddings=128, feature_names=["f"])]
    ebc = EmbeddingBagCollection(tables=t)
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([0, 5, 127]),
                            lengths=torch.tensor([2, 1]))
    for dtype, row_bytes, tol in (("fp16", 128, 1e-3), ("int8", 80, 1e-2), ("int4", 48, 0.1),
                                  ("int2", 32, 0.5)):
        q = quantize_ebc(ebc, dtype)
        assert stored_bytes(q) == 128 * row_bytes, dtype
        err = (q(kjt).values() - ebc(kjt).values()).abs().max()
        assert err < tol * ebc(kjt).values().abs().max(), dtype
