"""MECEmbeddingBagCollection in training: ids policy, kernel gradients, DLRM models, fx, CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchrec.fx
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import PoolingType

from mec_torchrec.modules import MECEmbeddingBagCollection, MECTableConfig
from mec_torchrec.modules.lookup import DenseTableBatchedLookup

pytestmark = pytest.mark.filterwarnings("ignore:.*autograd kernel was not registered")


def _tables(dim: int = 8) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="t_x", embedding_dim=dim, num_embeddings=400, feature_names=["x"]),
        EmbeddingBagConfig(name="t_y", embedding_dim=dim, num_embeddings=30, feature_names=["y"]),
        EmbeddingBagConfig(name="t_z", embedding_dim=dim, num_embeddings=200, feature_names=["z"]),
    ]


def _mec(**kwargs) -> MECEmbeddingBagCollection:
    torch.manual_seed(0)
    compression = {"t_x": MECTableConfig(4, 16), "t_z": MECTableConfig(2, 32)}
    return MECEmbeddingBagCollection(_tables(), compression, **kwargs)


def _kjt(x: list[int], y: list[int], z: list[int]) -> KeyedJaggedTensor:
    """One id per feature per sample (batch = len(x))."""
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["x", "y", "z"], values=torch.tensor(x + y + z), lengths=torch.ones(3 * len(x),
                                                                                  dtype=torch.int64))


def test_out_of_range_id_raises_naming_feature_id_and_table_size() -> None:
    mec = _mec()
    with pytest.raises(ValueError, match=r"table 't_z': id 200 out of range \[0, 200\) in feature 'z'"):
        mec(_kjt([1, 2], [3, 4], [5, 200]))
    with pytest.raises(ValueError, match=r"table 't_y': id -1 out of range \[0, 30\)"):
        mec(_kjt([1, 2], [-1, 4], [5, 6]))


def test_reserved_policy_serves_unknown_ids_as_the_last_row() -> None:
    mec = _mec(unknown_id_policy="reserved")
    out = mec(_kjt([400, 1234], [30, -5], [200, 9])).values()
    ref = mec(_kjt([399, 399], [29, 29], [199, 9])).values()
    assert torch.equal(out, ref)
    row_zero = mec(_kjt([0, 0], [0, 0], [0, 0])).values()
    assert not torch.equal(out[:, :8], row_zero[:, :8])


def test_unknown_policy_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown_id_policy"):
        _mec(unknown_id_policy="clamp")


@pytest.mark.parametrize("mean", [False, True])
def test_dense_kernel_gradients_match_pytorch_reference(mean: bool) -> None:
    """The CPU dense TBE op has no registered autograd kernel (a warning today): guard its grads."""
    torch.manual_seed(1)
    shapes = [(16, 4), (9, 8), (5, 4)]
    feature_tables = [0, 1, 2, 0]
    lookup = DenseTableBatchedLookup(shapes, feature_tables, [mean] * 4)
    weights = [torch.randn(r, d, requires_grad=True) for r, d in shapes]
    batch = 5
    lengths = torch.randint(0, 4, (4 * batch,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    indices = torch.cat([torch.randint(0, shapes[t][0], (int(n),))
                         for t, n in zip(feature_tables, lengths.view(4, batch).sum(1))])
    per_sample = None if mean else torch.rand(indices.numel())
    out = lookup(weights, indices, offsets, lengths, per_sample)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, weights, grad_out)

    ref_weights = [w.detach().clone().requires_grad_() for w in weights]
    parts = []
    for f, t in enumerate(feature_tables):
        bag_offsets = offsets[f * batch:(f + 1) * batch + 1]
        ids = indices[bag_offsets[0]:bag_offsets[-1]]
        psw = per_sample[bag_offsets[0]:bag_offsets[-1]] if per_sample is not None else None
        parts.append(F.embedding_bag(ids, ref_weights[t], bag_offsets[:-1] - bag_offsets[0],
                                     mode="mean" if mean else "sum", per_sample_weights=psw))
    ref = torch.cat(parts, dim=1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    expected = torch.autograd.grad(ref, ref_weights, grad_out)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def _batch(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, KeyedJaggedTensor,
                                                           torch.Tensor]:
    dense = torch.randn(batch, 5, generator=generator)
    x = torch.randint(0, 400, (batch,), generator=generator)
    y = torch.randint(0, 30, (batch,), generator=generator)
    z = torch.randint(0, 200, (batch,), generator=generator)
    labels = ((x % 3 == 0) ^ (y % 2 == 0)).float()
    return dense, _kjt(x.tolist(), y.tolist(), z.tolist()), labels


@pytest.mark.parametrize("model_name", ["DLRM", "DLRM_DCN"])
def test_torchrec_dlrm_models_train_with_it(model_name: str) -> None:
    mec = _mec()
    torch.manual_seed(2)
    if model_name == "DLRM":
        model = DLRM(mec, dense_in_features=5, dense_arch_layer_sizes=[16, 8],
                     over_arch_layer_sizes=[16, 1])
    else:
        model = DLRM_DCN(mec, dense_in_features=5, dense_arch_layer_sizes=[16, 8],
                         over_arch_layer_sizes=[16, 1], dcn_num_layers=2, dcn_low_rank_dim=4)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.02)
    dense, sparse, labels = _batch(64, torch.Generator().manual_seed(3))
    codes_before = mec.codes.t_x.clone()
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(dense, sparse).squeeze(1), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(mec.codes.t_x, codes_before)


def test_fx_traced_model_matches_eager() -> None:
    mec = _mec()
    model = DLRM(mec, dense_in_features=5, dense_arch_layer_sizes=[16, 8],
                 over_arch_layer_sizes=[16, 1])
    traced = torchrec.fx.symbolic_trace(model)
    dense, sparse, _ = _batch(8, torch.Generator().manual_seed(4))
    assert torch.equal(traced(dense, sparse), model(dense, sparse))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_cuda_output_and_gradients_match_decoded_ebc(pooling: PoolingType) -> None:
    tables = [EmbeddingBagConfig(name=t.name, embedding_dim=t.embedding_dim,
                                 num_embeddings=t.num_embeddings, feature_names=t.feature_names,
                                 pooling=pooling) for t in _tables()]
    torch.manual_seed(5)
    mec = MECEmbeddingBagCollection(tables, {"t_x": MECTableConfig(4, 16)}, device="cuda")
    assert mec.codes.t_x.is_cuda and mec.codebooks.embedding_bags["t_x@0"].weight.is_cuda
    ebc = mec.decompress()
    _, sparse, _ = _batch(32, torch.Generator().manual_seed(6))
    sparse = sparse.to(torch.device("cuda"))
    out, ref = mec(sparse), ebc(sparse)
    torch.testing.assert_close(out.values(), ref.values(), atol=1e-5, rtol=0)
    out.values().sum().backward()
    grad_y = mec.codebooks.embedding_bags["t_y"].weight.grad
    ref.values().sum().backward()
    torch.testing.assert_close(grad_y, ebc.embedding_bags["t_y"].weight.grad, atol=1e-5, rtol=0)
