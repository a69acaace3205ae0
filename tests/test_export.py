"""Export writes a checksummed artifact; the serving module loaded from it equals the training one."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import PoolingType

from mec_torchrec import cli
from mec_torchrec.export import (
    MECInferenceEmbeddingBagCollection,
    export_model,
    read_manifest,
)
from mec_torchrec.export.format import (
    FORMAT_VERSION,
    TensorEntry,
    decode_weight,
    encode_codebooks,
    encode_weight,
    manifest_checksum,
    sha256_file,
)
from mec_torchrec.modules import MECEmbeddingBagCollection, MECTableConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

DIM = 8
COMPRESSION = {"t_a": MECTableConfig(4, 16), "t_c": MECTableConfig(4, 8)}
# Serving layouts: one stacked lookup (the default for one D and one L) or one per table.
LAYOUTS = pytest.mark.parametrize("fused", [True, False], ids=["fused", "per_table"])


def tables() -> list[EmbeddingBagConfig]:
    """Compressed and full tables, SUM and MEAN, one table with two features; one dim (DLRM)."""
    return [
        EmbeddingBagConfig(name="t_a", embedding_dim=DIM, num_embeddings=500, feature_names=["a"]),
        EmbeddingBagConfig(name="t_b", embedding_dim=DIM, num_embeddings=7, feature_names=["b"]),
        EmbeddingBagConfig(name="t_c", embedding_dim=DIM, num_embeddings=300,
                           feature_names=["c", "d"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t_e", embedding_dim=DIM, num_embeddings=50, feature_names=["e"],
                           pooling=PoolingType.MEAN),
    ]


def make_mec(weighted: bool = False, **kwargs) -> MECEmbeddingBagCollection:
    torch.manual_seed(0)
    configs = tables()
    if weighted:
        configs = [t for t in configs if t.pooling == PoolingType.SUM]
    return MECEmbeddingBagCollection(configs, COMPRESSION if not weighted else
                                     {"t_a": COMPRESSION["t_a"]}, is_weighted=weighted, **kwargs)


def make_kjt(configs: list[EmbeddingBagConfig], batch: int, seed: int, weighted: bool = False,
             keys: list[str] | None = None) -> KeyedJaggedTensor:
    """Bags of 0-3 valid ids (empty bags included)."""
    g = torch.Generator().manual_seed(seed)
    sizes = {f: t.num_embeddings for t in configs for f in t.feature_names}
    keys = keys or list(sizes)
    lengths = torch.randint(0, 4, (len(keys), batch), generator=g)
    values = torch.cat([torch.randint(0, sizes[k], (int(lengths[i].sum()),), generator=g)
                        for i, k in enumerate(keys)])
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths.reshape(-1),
                             weights=weights)


def make_dlrm(mec: torch.nn.Module) -> DLRM:
    torch.manual_seed(1)
    return DLRM(embedding_bag_collection=mec, dense_in_features=3,
                dense_arch_layer_sizes=[8, DIM], over_arch_layer_sizes=[8, 1])


def int8_bound(mec: MECEmbeddingBagCollection, bag: int = 3) -> float:
    """Worst pooled error of int8 codebooks: half a quantization step per row, ``bag`` rows."""
    steps = [encode_codebooks(t.codebooks, "int8")["codebooks_scale"].max()
             for t in mec.compressed_tables().values()]
    return bag * float(max(steps)) / 2 + 1e-6


@LAYOUTS
@pytest.mark.parametrize("codebook_dtype", ["fp32", "fp16", "int8"])
def test_serving_output_equals_training_module(tmp_path: Path, codebook_dtype: str,
                                               fused: bool) -> None:
    mec = make_mec()
    export_model(mec, tmp_path / "art", codebook_dtype)
    serving = MECInferenceEmbeddingBagCollection.load(tmp_path / "art", fused=fused)
    assert serving.fused == fused
    kjt = make_kjt(tables(), batch=16, seed=1)
    out, ref = serving(kjt), mec(kjt)
    assert out.keys() == ref.keys() == ["a", "b", "c", "d", "e"]
    assert out.length_per_key() == ref.length_per_key()
    scale = float(ref.values().abs().max())
    atol = {"fp32": 1e-6, "fp16": 1e-3 * scale, "int8": int8_bound(mec)}[codebook_dtype]
    torch.testing.assert_close(out.values(), ref.values().detach(), atol=atol, rtol=0)


def one_hot_kjt(configs: list[EmbeddingBagConfig], batch: int, seed: int,
                weighted: bool = False) -> KeyedJaggedTensor:
    """One valid id per bag (a Criteo-style request)."""
    g = torch.Generator().manual_seed(seed)
    keys = [f for t in configs for f in t.feature_names]
    values = torch.cat([torch.randint(0, t.num_embeddings, (batch,), generator=g)
                        for t in configs for _ in t.feature_names])
    return KeyedJaggedTensor(keys=keys, values=values,
                             lengths=torch.ones(len(keys) * batch, dtype=torch.int64),
                             weights=torch.rand(values.numel(), generator=g) if weighted else None)


@LAYOUTS
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_int8_full_tables_are_stored_and_served_int8(tmp_path: Path, fused: bool,
                                                     weighted: bool) -> None:
    mec = make_mec(weighted)
    manifest = export_model(mec, tmp_path / "art", weight_dtype="int8")
    full = {t.name: t for t in manifest.tables if not t.compressed}
    assert full and all(t.weight_dtype == "int8" for t in full.values())
    for t in full.values():  # D bytes + float32 scale and bias per row
        assert t.tensors["weight"] == TensorEntry("uint8", [t.num_embeddings, DIM + 8])
    serving = MECInferenceEmbeddingBagCollection.load(tmp_path / "art", fused=fused)
    held = [serving.fused_packed] if fused else [getattr(serving.weights, n) for n in full]
    assert all(x.dtype == torch.uint8 and x.shape[1] == DIM + 8 for x in held)
    # The rows served are exactly the int8 ones: the training module over dequantized tables.
    reference = copy.deepcopy(mec)
    bags = reference.codebooks.embedding_bags
    steps = []
    for name in full:
        stored = encode_weight(bags[name].weight.detach(), "int8")
        steps.append(float(stored[:, DIM:].contiguous().view(torch.float32)[:, 0].max()))
        bags[name].weight.data.copy_(decode_weight(stored))
    configs = mec.embedding_bag_configs()
    for kjt in (make_kjt(configs, batch=16, seed=1, weighted=weighted),
                one_hot_kjt(configs, batch=5, seed=2, weighted=weighted)):
        out = serving(kjt).values()
        torch.testing.assert_close(out, reference(kjt).values().detach(), atol=1e-5, rtol=0)
        # ... within half a step per row of the float tables (bags of <= 3 rows, weights <= 1).
        torch.testing.assert_close(out, mec(kjt).values().detach(), atol=3 * max(steps) / 2 + 1e-5,
                                   rtol=0)


@LAYOUTS
def test_any_key_order_and_extra_keys_give_the_ebc_layout(tmp_path: Path, fused: bool) -> None:
    mec = make_mec()
    export_model(mec, tmp_path / "art")
    serving = MECInferenceEmbeddingBagCollection.load(tmp_path / "art", fused=fused)
    ordered = make_kjt(tables(), batch=5, seed=2)
    extra = [*tables(), EmbeddingBagConfig(name="t_z", embedding_dim=2, num_embeddings=3,
                                           feature_names=["z"])]
    shuffled = make_kjt(extra, batch=5, seed=3, keys=["e", "z", "d", "a", "c", "b"])
    for kjt in (ordered, shuffled):
        torch.testing.assert_close(serving(kjt).values(), mec(kjt).values().detach(),
                                   atol=1e-6, rtol=0)


@LAYOUTS
def test_weighted_serving_equals_training_module(tmp_path: Path, fused: bool) -> None:
    mec = make_mec(weighted=True)
    export_model(mec, tmp_path / "art")
    serving = MECInferenceEmbeddingBagCollection.load(tmp_path / "art", fused=fused)
    assert serving.is_weighted()
    kjt = make_kjt(mec.embedding_bag_configs(), batch=9, seed=4, weighted=True)
    torch.testing.assert_close(serving(kjt).values(), mec(kjt).values().detach(),
                               atol=1e-6, rtol=0)


def test_serving_module_holds_buffers_only_and_maps_the_codes(tmp_path: Path) -> None:
    export_model(make_mec(), tmp_path / "art")
    assert list(MECInferenceEmbeddingBagCollection.load(tmp_path / "art").parameters()) == []
    serving = MECInferenceEmbeddingBagCollection.load(tmp_path / "art", fused=False)
    assert list(serving.parameters()) == []
    assert serving.codes.t_a.dtype == torch.uint8
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps to check the mapping")
    pointer = serving.codes.t_a.data_ptr()
    blob = str((tmp_path / "art" / "tables" / "t_a.safetensors").resolve())
    mapped = [line.split()[0].split("-") for line in maps.read_text().splitlines()
              if line.endswith(blob)]
    assert any(int(lo, 16) <= pointer < int(hi, 16) for lo, hi in mapped)


@pytest.mark.parametrize("weighted", [False, True])
def test_one_id_per_bag_requests_equal_the_training_module(tmp_path: Path,
                                                          weighted: bool) -> None:
    mec = make_mec(weighted=weighted)
    export_model(mec, tmp_path / "art")
    fused = MECInferenceEmbeddingBagCollection.load(tmp_path / "art")
    per_table = MECInferenceEmbeddingBagCollection.load(tmp_path / "art", fused=False)
    assert fused.fused
    configs = mec.embedding_bag_configs()
    g = torch.Generator().manual_seed(10)
    keys = [f for t in configs for f in t.feature_names]
    sizes = [t.num_embeddings for t in configs for _ in t.feature_names]
    for batch in (1, 5):
        kjt = KeyedJaggedTensor(
            keys=keys,
            values=torch.cat([torch.randint(0, n, (batch,), generator=g) for n in sizes]),
            lengths=torch.ones(len(keys) * batch, dtype=torch.int64),
            weights=torch.rand(len(keys) * batch, generator=g) if weighted else None,
        )
        ref = mec(kjt).values().detach()
        torch.testing.assert_close(fused(kjt).values(), ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(per_table(kjt).values(), ref, atol=1e-6, rtol=0)


def test_tables_of_different_subspaces_are_served_per_table(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mec = MECEmbeddingBagCollection(tables(), {"t_a": MECTableConfig(4, 16),
                                               "t_c": MECTableConfig(2, 8)})
    export_model(mec, tmp_path / "art")
    serving = MECInferenceEmbeddingBagCollection.load(tmp_path / "art")
    assert not serving.fused
    with pytest.raises(ValueError, match="fused=True needs"):
        MECInferenceEmbeddingBagCollection.load(tmp_path / "art", fused=True)
    kjt = make_kjt(tables(), batch=6, seed=9)
    torch.testing.assert_close(serving(kjt).values(), mec(kjt).values().detach(),
                               atol=1e-6, rtol=0)


def test_manifest_describes_every_table_and_blob(tmp_path: Path) -> None:
    export_model(make_mec(), tmp_path / "art", "int8")
    manifest = read_manifest(tmp_path / "art")
    assert manifest.format_version == FORMAT_VERSION
    by_name = {t.name: t for t in manifest.tables}
    assert list(by_name) == ["t_a", "t_b", "t_c", "t_e"]
    a, b, c = by_name["t_a"], by_name["t_b"], by_name["t_c"]
    assert (a.num_embeddings, a.embedding_dim, a.num_subspaces, a.codebook_size) == (500, 8, 4, 16)
    assert (a.code_dtype, a.codebook_dtype, a.pooling) == ("uint8", "int8", "SUM")
    assert set(a.tensors) == {"codes", "codebooks", "codebooks_scale", "codebooks_bias"}
    assert (c.feature_names, c.pooling) == (["c", "d"], "MEAN")
    assert not b.compressed and b.tensors["weight"].shape == [7, 8]
    for t in manifest.tables:
        blob = tmp_path / "art" / t.blob
        assert t.blob_bytes == blob.stat().st_size and t.sha256 == sha256_file(blob)
    # Codes are counted: 500 x 4 uint8 + 4 x 16 x 2 int8 + scale/bias, against 500 x 8 x 4.
    assert a.tensor_bytes == 2000 + 128 + 2 * 64 * 4
    assert a.full_bytes == 500 * 8 * 4


def test_the_manifest_carries_the_sha256_of_its_canonical_json(tmp_path: Path) -> None:
    written = export_model(make_mec(), tmp_path / "art")
    raw = json.loads((tmp_path / "art" / "manifest.json").read_text())
    # The definition, so a tool in any language can check it: every other field, keys sorted,
    # no spaces.
    rest = {k: v for k, v in raw.items() if k != "manifest_sha256"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()
    assert raw["manifest_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert raw["manifest_sha256"] == manifest_checksum(raw) == written.manifest_sha256
    assert read_manifest(tmp_path / "art") == written


def test_export_finds_the_mec_module_inside_a_model(tmp_path: Path) -> None:
    mec = make_mec()
    export_model(make_dlrm(mec), tmp_path / "art")
    serving = MECInferenceEmbeddingBagCollection.load(tmp_path / "art")
    kjt = make_kjt(tables(), batch=4, seed=5)
    torch.testing.assert_close(serving(kjt).values(), mec(kjt).values().detach(),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="holds no MECEmbeddingBagCollection"):
        export_model(torch.nn.Linear(2, 2), tmp_path / "none")


def test_export_from_state_dict_and_from_dcp_checkpoint(tmp_path: Path) -> None:
    mec = make_mec()
    dlrm = make_dlrm(mec)
    # The DLRM app saves {"model": DMP state dict} with torch.distributed.checkpoint.
    dcp.save({"model": dlrm.state_dict()}, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    export_model(tmp_path / "ckpt", tmp_path / "from_dcp")
    export_model(dlrm.state_dict(), tmp_path / "from_state")
    kjt = make_kjt(tables(), batch=6, seed=6)
    pooling = {t.name: t.pooling for t in tables()}
    export_model(dlrm.state_dict(), tmp_path / "pooled", pooling=pooling,
                 feature_names={"t_c": ["c", "d"]})
    served = MECInferenceEmbeddingBagCollection.load(tmp_path / "pooled")
    torch.testing.assert_close(served(kjt).values(), mec(kjt).values().detach(),
                               atol=1e-6, rtol=0)
    # Without configs the defaults apply (t_X serves X, SUM): same tensors, same blobs.
    a, b = read_manifest(tmp_path / "from_dcp"), read_manifest(tmp_path / "from_state")
    assert [t.sha256 for t in a.tables] == [t.sha256 for t in b.tables]
    assert [t.feature_names for t in a.tables] == [["a"], ["b"], ["c"], ["e"]]


def test_export_replaces_an_artifact_atomically(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    export_model(make_mec(), tmp_path / "art")
    before = (tmp_path / "art" / "manifest.json").read_text()
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    from mec_torchrec.export import writer

    save_file = writer.save_file
    monkeypatch.setattr(writer, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_model(make_mec(), tmp_path / "art", "fp16")
    assert (tmp_path / "art" / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_cli_exports_a_checkpoint_and_inspects_it(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    dcp.save({"model": make_dlrm(make_mec()).state_dict()}, checkpoint_id=tmp_path / "ckpt",
             no_dist=True)
    out = tmp_path / "art"
    features = json.dumps({"t_c": ["c", "d"]})
    assert cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out),
                     "--codebook-dtype", "fp16", "--weight-dtype", "int8",
                     "--features", features]) == 0
    assert {t.name: t.weight_dtype for t in read_manifest(out).tables} == {
        "t_a": None, "t_b": "int8", "t_c": None, "t_e": "int8"}
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "format_version" not in text and f"v{FORMAT_VERSION}" in text
    checksum = read_manifest(out).manifest_sha256
    assert f"manifest_sha256: {checksum} (matches its content)" in text
    for name in ("t_a", "t_b", "t_c", "t_e", "c,d", "fp16", "int8", "uint8", "total"):
        assert name in text
    t_b = next(line for line in text.splitlines() if line.startswith("t_b "))
    assert t_b.split()[7] == "int8"  # the dtype column: int8 rows for a full table
    assert cli.main(["inspect", str(tmp_path / "nothing")]) == 2
