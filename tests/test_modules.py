"""MECEmbeddingBagCollection behaves like an EmbeddingBagCollection holding its decoded rows."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from mec_torchrec.modules import MECEmbeddingBagCollection, MECTableConfig
from mec_torchrec.quantize import CompressedTable

pytestmark = pytest.mark.filterwarnings("ignore:.*autograd kernel was not registered")


def _tables(pooling: PoolingType = PoolingType.SUM) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="t_a", embedding_dim=8, num_embeddings=500, feature_names=["a"],
                           pooling=pooling),
        EmbeddingBagConfig(name="t_b", embedding_dim=4, num_embeddings=7, feature_names=["b"],
                           pooling=pooling),
        EmbeddingBagConfig(name="t_c", embedding_dim=12, num_embeddings=300,
                           feature_names=["c", "d"], pooling=pooling),
        EmbeddingBagConfig(name="t_e", embedding_dim=4, num_embeddings=50, feature_names=["e"],
                           pooling=PoolingType.MEAN),
    ]


COMPRESSION = {"t_a": MECTableConfig(4, 16), "t_c": MECTableConfig(3, 8)}


def random_kjt(tables: list[EmbeddingBagConfig], batch: int, weighted: bool,
               generator: torch.Generator, keys: list[str] | None = None) -> KeyedJaggedTensor:
    """Bags of 0-3 ids (empty bags included), keys in ``keys`` order (default: table order)."""
    sizes = {f: t.num_embeddings for t in tables for f in t.feature_names}
    keys = keys or list(sizes)
    lengths = torch.randint(0, 4, (len(keys), batch), generator=generator)
    values = torch.cat([
        torch.randint(0, sizes[k], (int(lengths[i].sum()),), generator=generator)
        for i, k in enumerate(keys)
    ])
    weights = torch.rand(values.numel(), generator=generator) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths.reshape(-1),
                             weights=weights)


def make_mec(tables=None, compression=None, **kwargs) -> MECEmbeddingBagCollection:
    torch.manual_seed(0)
    return MECEmbeddingBagCollection(tables or _tables(), compression or COMPRESSION, **kwargs)


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("shuffled_keys", [False, True])
def test_output_equals_ebc_of_decoded_rows(pooling: PoolingType, shuffled_keys: bool) -> None:
    mec = make_mec(_tables(pooling))
    ebc = mec.decompress()
    g = torch.Generator().manual_seed(1)
    keys = ["e", "d", "a", "c", "b"] if shuffled_keys else None
    for _ in range(3):
        kjt = random_kjt(_tables(), batch=9, weighted=False, generator=g, keys=keys)
        out, ref = mec(kjt), ebc(kjt)
        assert out.keys() == ref.keys() == ["a", "b", "c", "d", "e"]
        assert out.length_per_key() == ref.length_per_key()
        torch.testing.assert_close(out.values(), ref.values(), atol=1e-5, rtol=0)


def test_weighted_output_equals_ebc_of_decoded_rows() -> None:
    tables = [t for t in _tables() if t.pooling == PoolingType.SUM]
    mec = make_mec(tables, is_weighted=True)
    ebc = mec.decompress()
    kjt = random_kjt(tables, batch=11, weighted=True, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(mec(kjt).values(), ebc(kjt).values(), atol=1e-5, rtol=0)


def test_forward_equals_regroup_of_inner_lookup_of_remap() -> None:
    mec = make_mec()
    kjt = random_kjt(_tables(), batch=5, weighted=False, generator=torch.Generator().manual_seed(3))
    remapped = mec.remap(kjt)
    assert remapped.keys() == [f for t in mec.codebooks.embedding_bag_configs()
                               for f in t.feature_names]
    staged = mec.regroup(mec.codebooks(remapped).to_dict())
    torch.testing.assert_close(staged.values(), mec(kjt).values(), atol=1e-6, rtol=0)


def test_remap_emits_codes_per_subspace_with_same_lengths() -> None:
    mec = make_mec()
    kjt = KeyedJaggedTensor(keys=["a", "b", "c", "d", "e"],
                            values=torch.tensor([3, 499, 6, 1, 2]),
                            lengths=torch.tensor([2, 0, 1, 0, 1, 0, 0, 1, 0, 0]))
    out = mec.remap(kjt).to_dict()
    for sub in range(4):
        assert out[f"a@{sub}"].values().tolist() == mec.codes.t_a[[3, 499], sub].tolist()
        assert out[f"a@{sub}"].lengths().tolist() == [2, 0]
    assert out["c@2"].values().tolist() == [mec.codes.t_c[1, 2].item()]
    assert out["b"].values().tolist() == [6]


def test_codes_are_small_persistent_buffers_not_parameters() -> None:
    mec = make_mec()
    assert mec.codes.t_a.dtype == torch.uint8 and mec.codes.t_a.shape == (500, 4)
    assert "codes.t_a" in mec.state_dict() and "codes.t_c" in mec.state_dict()
    assert not any(name.startswith("codes") for name, _ in mec.named_parameters())
    assert "codebooks.embedding_bags.t_a@3.weight" in dict(mec.named_parameters())


def test_gradients_reach_codebooks_and_codes_stay_fixed() -> None:
    mec = make_mec()
    codes_before = {n: b.clone() for n, b in mec.codes.named_buffers()}
    optimizer = torch.optim.Adagrad(mec.parameters(), lr=0.1)
    kjt = random_kjt(_tables(), batch=16, weighted=False, generator=torch.Generator().manual_seed(4))
    mec(kjt).values().square().sum().backward()
    for name, param in mec.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    before = mec.codebooks.embedding_bags["t_a@0"].weight.clone()
    optimizer.step()
    assert not torch.equal(before, mec.codebooks.embedding_bags["t_a@0"].weight)
    for name, buf in mec.codes.named_buffers():
        assert torch.equal(buf, codes_before[name])


def test_from_ebc_serves_the_compressed_tables_and_copies_the_rest() -> None:
    torch.manual_seed(5)
    ebc = EmbeddingBagCollection(tables=_tables())
    compressed = {
        "t_a": CompressedTable(torch.randint(0, 16, (500, 4)), torch.randn(4, 16, 2)),
        "t_c": CompressedTable(torch.randint(0, 8, (300, 3)), torch.randn(3, 8, 4)),
    }
    mec = MECEmbeddingBagCollection.from_ebc(ebc, compressed)
    kjt = random_kjt(_tables(), batch=7, weighted=False, generator=torch.Generator().manual_seed(6))
    out = mec(kjt).to_dict()
    ref = ebc(kjt).to_dict()
    for full in ("b", "e"):
        torch.testing.assert_close(out[full], ref[full], atol=1e-6, rtol=0)
    decoded = mec.decompress()
    torch.testing.assert_close(decoded.embedding_bags["t_a"].weight, compressed["t_a"].decode())
    exported = mec.compressed_tables()
    assert torch.equal(exported["t_c"].codes, compressed["t_c"].codes)
    torch.testing.assert_close(exported["t_c"].codebooks, compressed["t_c"].codebooks)


def test_state_dict_round_trip() -> None:
    mec = make_mec()
    torch.manual_seed(7)
    other = MECEmbeddingBagCollection(_tables(), COMPRESSION)
    assert not torch.equal(other.codes.t_a, mec.codes.t_a)
    other.load_state_dict(mec.state_dict())
    kjt = random_kjt(_tables(), batch=6, weighted=False, generator=torch.Generator().manual_seed(8))
    assert torch.equal(other(kjt).values(), mec(kjt).values())
    assert torch.equal(other.codes.t_c, mec.codes.t_c)


def test_output_equals_ebc_for_one_hot_batches_with_uniform_codes() -> None:
    """One id per bag and one L for all compressed tables: remap's stacked-transpose path."""
    tables = [t for t in _tables() if len(t.feature_names) == 1 and t.name != "t_e"]
    tables.append(EmbeddingBagConfig(name="t_e", embedding_dim=4, num_embeddings=50,
                                     feature_names=["e"]))
    mec = make_mec(tables, {"t_a": MECTableConfig(4, 16), "t_e": MECTableConfig(4, 8)},
                   is_weighted=True)
    ebc = mec.decompress()
    g = torch.Generator().manual_seed(9)
    batch = 6
    values = torch.cat([torch.randint(0, t.num_embeddings, (batch,), generator=g) for t in tables])
    kjt = KeyedJaggedTensor(keys=["a", "b", "e"], values=values,
                            lengths=torch.ones(3 * batch, dtype=torch.int64),
                            weights=torch.rand(values.numel(), generator=g))
    torch.testing.assert_close(mec(kjt).values(), ebc(kjt).values(), atol=1e-5, rtol=0)
    assert mec.remap(kjt).to_dict()["e@3"].values().tolist() == \
        mec.codes.t_e[values[2 * batch:], 3].tolist()


def test_embedding_bytes_count_codes_and_codebooks() -> None:
    sizes = make_mec().embedding_bytes()
    assert sizes["t_a"].full == 500 * 8 * 4
    assert sizes["t_a"].stored == 500 * 4 * 1 + 4 * 16 * 2 * 4  # uint8 codes + codebooks
    assert sizes["t_b"].stored == sizes["t_b"].full == 7 * 4 * 4
    assert sizes["t_a"].ratio == sizes["t_a"].full / sizes["t_a"].stored


def test_module_built_on_meta_remaps_and_serves_once_codes_and_weights_are_loaded() -> None:
    """DMP's path: build on meta, materialise, load. No index state is left behind on meta."""
    reference = make_mec()
    meta = MECEmbeddingBagCollection(_tables(), COMPRESSION, device="meta")
    meta.codes.to_empty(device="cpu")
    for name, buf in reference.codes.named_buffers():
        getattr(meta.codes, name).copy_(buf)
    kjt = random_kjt(_tables(), batch=5, weighted=False, generator=torch.Generator().manual_seed(10))
    got, want = meta.remap(kjt), reference.remap(kjt)
    assert got.keys() == want.keys()
    assert torch.equal(got.values(), want.values()) and torch.equal(got.lengths(), want.lengths())

    meta.to_empty(device="cpu")
    meta.load_state_dict(reference.state_dict())
    assert torch.equal(meta(kjt).values(), reference(kjt).values())
