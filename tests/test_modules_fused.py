"""The fused CPU kernel (codes read inside the pooling loop) equals the remap + TBE path."""

from __future__ import annotations

import pytest
import torch
from test_modules import COMPRESSION, _tables, random_kjt
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from mec_torchrec.modules import MECEmbeddingBagCollection, MECTableConfig, fused

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*autograd kernel was not registered"),
    pytest.mark.skipif(not fused.available(), reason="fused lookup extension did not build"),
]


def _pair(
    tables: list[EmbeddingBagConfig], compression: dict[str, MECTableConfig], weighted: bool
) -> tuple[MECEmbeddingBagCollection, MECEmbeddingBagCollection]:
    torch.manual_seed(0)
    fused_mec = MECEmbeddingBagCollection(tables, compression, is_weighted=weighted, kernel="fused")
    tbe_mec = MECEmbeddingBagCollection(tables, compression, is_weighted=weighted, kernel="tbe")
    tbe_mec.load_state_dict(fused_mec.state_dict())
    assert fused_mec.uses_fused_kernel() and not tbe_mec.uses_fused_kernel()
    return fused_mec, tbe_mec


def _grads(mec: MECEmbeddingBagCollection) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in mec.named_parameters()}


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
def test_outputs_and_gradients_equal_tbe_path(pooling: PoolingType, weighted: bool) -> None:
    # Mixed tables: compressed (one and two features), full, a MEAN table among SUM ones;
    # random_kjt draws empty bags. Keys in a non-table order exercise the permute.
    tables = _tables(pooling)
    fused_mec, tbe_mec = _pair(tables, COMPRESSION, weighted)
    codes = {n: b.clone() for n, b in fused_mec.codes.named_buffers()}
    for seed in range(3):
        kjt = random_kjt(
            tables,
            16,
            weighted,
            torch.Generator().manual_seed(seed),
            keys=["e", "c", "a", "d", "b"],
        )
        assert (kjt.lengths() == 0).any()
        out_f, out_t = fused_mec(kjt), tbe_mec(kjt)
        assert out_f.keys() == out_t.keys()
        assert out_f.length_per_key() == out_t.length_per_key()
        torch.testing.assert_close(out_f.values(), out_t.values(), atol=1e-5, rtol=1e-5)
        fused_mec.zero_grad()
        tbe_mec.zero_grad()
        grad = torch.randn_like(out_t.values())
        (out_f.values() * grad).sum().backward()
        (out_t.values() * grad).sum().backward()
        grads_f, grads_t = _grads(fused_mec), _grads(tbe_mec)
        assert grads_f.keys() == grads_t.keys()
        for name in grads_t:
            torch.testing.assert_close(grads_f[name], grads_t[name], atol=1e-5, rtol=1e-5)
    for name, buffer in fused_mec.codes.named_buffers():
        assert torch.equal(buffer, codes[name])
        assert buffer.grad is None and not buffer.requires_grad


@pytest.mark.parametrize("codebook_size", [16, 300, 40000])  # uint8, int16, int32 codes
def test_code_dtypes(codebook_size: int) -> None:
    tables = [
        EmbeddingBagConfig(name="t", embedding_dim=6, num_embeddings=40, feature_names=["f"]),
        EmbeddingBagConfig(name="u", embedding_dim=2, num_embeddings=5, feature_names=["g"]),
    ]
    fused_mec, tbe_mec = _pair(tables, {"t": MECTableConfig(3, codebook_size)}, weighted=False)
    kjt = random_kjt(tables, 8, False, torch.Generator().manual_seed(1))
    torch.testing.assert_close(fused_mec(kjt).values(), tbe_mec(kjt).values(), atol=1e-5, rtol=1e-5)
    fused_mec(kjt).values().sum().backward()
    tbe_mec(kjt).values().sum().backward()
    for (name, p), (_, q) in zip(fused_mec.named_parameters(), tbe_mec.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_per_sample_weight_gradients_match() -> None:
    tables = _tables(PoolingType.MEAN)
    fused_mec, tbe_mec = _pair(tables, COMPRESSION, weighted=True)
    kjt = random_kjt(tables, 8, True, torch.Generator().manual_seed(2))
    grads = []
    for mec in (fused_mec, tbe_mec):
        weights = kjt.weights().clone().requires_grad_(True)
        leaf = KeyedJaggedTensor(
            keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=weights
        )
        mec(leaf).values().pow(2).sum().backward()
        grads.append(weights.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_all_bags_empty() -> None:
    tables = _tables()
    fused_mec, tbe_mec = _pair(tables, COMPRESSION, weighted=False)
    kjt = KeyedJaggedTensor(
        keys=["a", "b", "c", "d", "e"],
        values=torch.zeros(0, dtype=torch.int64),
        lengths=torch.zeros(5 * 3, dtype=torch.int64),
    )
    out = fused_mec(kjt).values()
    assert torch.equal(out, tbe_mec(kjt).values()) and not out.any()
    out.sum().backward()
    assert all(not p.grad.any() for p in fused_mec.parameters())


def test_default_kernel_and_validation() -> None:
    mec = MECEmbeddingBagCollection(_tables(), COMPRESSION)
    assert mec.kernel == "auto" and mec.uses_fused_kernel()
    with pytest.raises(ValueError, match="kernel must be one of"):
        MECEmbeddingBagCollection(_tables(), COMPRESSION, kernel="gpu")


def test_fx_trace_keeps_fused_lookup_as_one_node() -> None:
    import torchrec.fx

    tables = _tables()
    fused_mec, _ = _pair(tables, COMPRESSION, weighted=False)
    traced = torchrec.fx.symbolic_trace(fused_mec)
    assert any(
        getattr(n.target, "__name__", "") == "fused_pooled_lookup" for n in traced.graph.nodes
    )
    kjt = random_kjt(tables, 4, False, torch.Generator().manual_seed(3))
    assert torch.equal(traced(kjt).values(), fused_mec(kjt).values())


def test_build_failure_falls_back_to_tbe_path_with_one_warning(monkeypatch, caplog) -> None:
    import torch.utils.cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(fused, "_ext", None)
    monkeypatch.setattr(fused, "_tried", False)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    tables = _tables()
    auto = MECEmbeddingBagCollection(tables, COMPRESSION)
    with caplog.at_level("WARNING", logger=fused.__name__):
        assert not auto.uses_fused_kernel() and not auto.uses_fused_kernel()
    assert sum("fused MEC lookup unavailable" in r.message for r in caplog.records) == 1
    kjt = random_kjt(tables, 4, False, torch.Generator().manual_seed(5))
    tbe = MECEmbeddingBagCollection(tables, COMPRESSION, kernel="tbe")
    tbe.load_state_dict(auto.state_dict())
    assert torch.equal(auto(kjt).values(), tbe(kjt).values())
    with pytest.raises(RuntimeError, match="failed to build"):
        MECEmbeddingBagCollection(tables, COMPRESSION, kernel="fused").uses_fused_kernel()


@pytest.mark.parametrize("loss", ["sum", "transposed", "row_broadcast"])
def test_gradient_layouts(loss: str) -> None:
    # The backward reads broadcast (out.sum()) and strided gradients in place.
    tables = _tables(PoolingType.MEAN)
    fused_mec, tbe_mec = _pair(tables, COMPRESSION, weighted=False)
    kjt = random_kjt(tables, 6, False, torch.Generator().manual_seed(6))
    for mec in (fused_mec, tbe_mec):
        out = mec(kjt).values()
        if loss == "sum":
            out.sum().backward()
        elif loss == "transposed":
            scale = torch.arange(out.numel(), dtype=torch.float32).reshape(out.shape[1], -1)
            (out.t() * scale).sum().backward()
        else:
            (out * torch.linspace(0, 1, out.shape[1])).sum().backward()
    for (name, p), (_, q) in zip(fused_mec.named_parameters(), tbe_mec.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)


def _specialised_tables(pooling: PoolingType) -> list[EmbeddingBagConfig]:
    # Shapes the kernel specialises (L x D/L: 4 x 16 uint8, 2 x 8 int16 codes, 8 x 4; full
    # tables of D 8 and 32), beside a generic one (3 x 2) whose odd width unaligns the columns.
    def table(name: str, dim: int, rows: int, features: list[str]) -> EmbeddingBagConfig:
        return EmbeddingBagConfig(
            name=name,
            embedding_dim=dim,
            num_embeddings=rows,
            feature_names=features,
            pooling=pooling,
        )

    return [
        table("p", 64, 300, ["p1", "p2"]),
        table("q", 16, 200, ["q"]),
        table("r", 32, 100, ["r"]),
        table("s", 8, 9, ["s"]),
        table("u", 32, 5, ["u"]),
        table("v", 6, 50, ["v"]),
    ]


SPECIALISED = {
    "p": MECTableConfig(4, 256),
    "q": MECTableConfig(2, 300),
    "r": MECTableConfig(8, 16),
    "v": MECTableConfig(3, 4),
}


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("drop", [None, "v"])  # with "v" dropped every column is 16-byte aligned
def test_specialised_kernels_equal_tbe_path(
    pooling: PoolingType, weighted: bool, drop: str | None
) -> None:
    tables = [t for t in _specialised_tables(pooling) if t.name != drop]
    compression = {k: c for k, c in SPECIALISED.items() if k != drop}
    fused_mec, tbe_mec = _pair(tables, compression, weighted)
    for seed in range(2):
        kjt = random_kjt(tables, 37, weighted, torch.Generator().manual_seed(seed))
        out_f, out_t = fused_mec(kjt).values(), tbe_mec(kjt).values()
        torch.testing.assert_close(out_f, out_t, atol=1e-5, rtol=1e-5)
        fused_mec.zero_grad()
        tbe_mec.zero_grad()
        grad = torch.randn_like(out_t)
        (out_f * grad).sum().backward()
        (out_t * grad).sum().backward()
        for (name, p), (_, q) in zip(fused_mec.named_parameters(), tbe_mec.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_first_out_of_range_finds_the_first_bad_id(dtype: torch.dtype) -> None:
    sizes = (5, 3, 7)
    values = torch.tensor([0, 4, 2, 0, 1, 6, 6, 0], dtype=dtype)
    assert fused.first_out_of_range(values, [2, 3, 3], sizes) == -1
    for position, bad in [(1, 5), (2, 3), (4, -1), (7, 7)]:
        broken = values.clone()
        broken[position] = bad
        broken[-1] = 9 if position < 7 else broken[-1]  # a later bad id does not win
        assert fused.first_out_of_range(broken, [2, 3, 3], sizes) == position


def test_several_chunks_and_threads_equal_tbe_path() -> None:
    # B = 1100: three 512-sample chunks in the forward, split over 2 threads; the backward
    # splits its feature groups over the threads.
    tables = _specialised_tables(PoolingType.SUM)
    fused_mec, tbe_mec = _pair(tables, SPECIALISED, weighted=True)
    kjt = random_kjt(tables, 1100, True, torch.Generator().manual_seed(7))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out_f, out_t = fused_mec(kjt).values(), tbe_mec(kjt).values()
        grad = torch.randn_like(out_t)
        (out_f * grad).sum().backward()
        (out_t * grad).sum().backward()
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out_f, out_t, atol=1e-5, rtol=1e-5)
    for (name, p), (_, q) in zip(fused_mec.named_parameters(), tbe_mec.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)
