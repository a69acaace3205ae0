"""A broken artifact is refused with a message naming the file and the mismatch; bad ids too."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_export import make_mec
from torchrec import KeyedJaggedTensor

from mec_torchrec import cli
from mec_torchrec.export import (
    ArtifactError,
    MECInferenceEmbeddingBagCollection,
    export_model,
    read_manifest,
)
from mec_torchrec.export.format import manifest_checksum, sha256_file
from mec_torchrec.export.program import script_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    export_model(make_mec(), tmp_path / "art", "int8")
    return tmp_path / "art"


def edit_manifest(root: Path, edit, sign: bool = True) -> None:
    """Pass the manifest through ``edit``, then sign it again (``sign``: so the checks behind
    its checksum are reached) or not."""
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if sign:
        manifest["manifest_sha256"] = manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))


def table_entry(manifest: dict, name: str) -> dict:
    return next(t for t in manifest["tables"] if t["name"] == name)


def test_missing_blob_is_refused(artifact: Path) -> None:
    (artifact / "tables" / "t_c.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"table 't_c' .*t_c\.safetensors\): blob is missing"):
        MECInferenceEmbeddingBagCollection.load(artifact)


def test_truncated_blob_is_refused_even_without_verify(artifact: Path) -> None:
    blob = artifact / "tables" / "t_a.safetensors"
    blob.write_bytes(blob.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"t_a.*bytes on disk, manifest says .*truncated"):
        MECInferenceEmbeddingBagCollection.load(artifact, verify=False)


def test_checksum_mismatch_is_refused(artifact: Path) -> None:
    blob = artifact / "tables" / "t_a.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # one code flipped, same size
    blob.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"t_a.*sha256 [0-9a-f]{64} does not match"):
        MECInferenceEmbeddingBagCollection.load(artifact)


@pytest.mark.parametrize("version", [99, 0, True, 2.0, "2"])
def test_unknown_format_version_is_refused_naming_the_versions_read(artifact: Path,
                                                                    version: object) -> None:
    edit_manifest(artifact, lambda m: m.update(format_version=version))
    message = rf"format_version {version!r} is not supported \(this code reads versions \[1, 2, 3\]\)"
    with pytest.raises(ArtifactError, match=message):
        MECInferenceEmbeddingBagCollection.load(artifact)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize(
    "edit",
    [
        lambda m: table_entry(m, "t_c").update(feature_names=["d", "c"]),
        lambda m: table_entry(m, "t_a").update(name="t_z"),
        lambda m: m.update(is_weighted=True),
        lambda m: m.update(unknown_id_policy="reserved"),
        lambda m: m.update(format_version=1),
    ],
    ids=["feature-names", "table-name", "is-weighted", "unknown-id-policy", "version-1"],
)
def test_an_unsigned_manifest_edit_is_refused(artifact: Path, edit, verify: bool) -> None:
    # Each of these edits is well-formed: without the checksum it was served as written.
    edit_manifest(artifact, edit, sign=False)
    path = re.escape(str(artifact / "manifest.json"))
    with pytest.raises(ArtifactError, match=rf"{path}: manifest_sha256 [0-9a-f]{{64}} does not "
                                            rf"match its content \([0-9a-f]{{64}}\): edited"):
        MECInferenceEmbeddingBagCollection.load(artifact, verify=verify)


@pytest.mark.parametrize("version", [2, 3])
def test_a_manifest_without_its_checksum_is_refused(artifact: Path, version: int) -> None:
    edit_manifest(artifact, lambda m: (m.pop("manifest_sha256"), m.update(format_version=version)),
                  sign=False)  # fmt: skip
    path = re.escape(str(artifact / "manifest.json"))
    with pytest.raises(ArtifactError, match=rf"{path}: no manifest_sha256 "
                                            rf"\(format_version {version} requires one\)"):
        MECInferenceEmbeddingBagCollection.load(artifact)


def test_a_version_1_manifest_without_a_checksum_loads_and_serves_the_same(artifact: Path) -> None:
    batch = kjt_with([3, 499, 0])
    want = MECInferenceEmbeddingBagCollection.load(artifact)(batch).values()
    # What the writer wrote before the checksum: version 1, no manifest_sha256.
    edit_manifest(artifact, lambda m: (m.pop("manifest_sha256"), m.update(format_version=1)),
                  sign=False)  # fmt: skip
    manifest = read_manifest(artifact)
    assert (manifest.format_version, manifest.manifest_sha256) == (1, None)
    got = MECInferenceEmbeddingBagCollection.load(artifact)(batch).values()
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_inspect_says_a_version_1_manifest_has_no_checksum(artifact: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    edit_manifest(artifact, lambda m: (m.pop("manifest_sha256"), m.update(format_version=1)),
                  sign=False)  # fmt: skip
    assert cli.main(["inspect", str(artifact)]) == 0
    assert "manifest_sha256: none (a v1 manifest carries none)" in capsys.readouterr().out


def test_missing_manifest_is_refused(artifact: Path) -> None:
    (artifact / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        MECInferenceEmbeddingBagCollection.load(artifact)


def test_manifest_shapes_disagreeing_with_its_configs_are_refused(artifact: Path) -> None:
    edit_manifest(artifact, lambda m: table_entry(m, "t_a").update(num_embeddings=501))
    with pytest.raises(ArtifactError, match=r"t_a.*configs imply .*'codes': \[501, 4\]"):
        MECInferenceEmbeddingBagCollection.load(artifact)


def test_blob_tensor_of_another_shape_is_refused(artifact: Path) -> None:
    # A well-formed blob with the right name, size and checksum in the manifest, wrong shape.
    blob = artifact / "tables" / "t_b.safetensors"
    save_file({"weight": torch.zeros(8, 7)}, str(blob))

    def edit(manifest: dict) -> None:
        table_entry(manifest, "t_b").update(blob_bytes=blob.stat().st_size,
                                            sha256=sha256_file(blob))

    edit_manifest(artifact, edit)
    with pytest.raises(ArtifactError, match=r"tensor 'weight' is torch.float32 \[8, 7\], "
                                            r"manifest says float32 \[7, 8\]"):
        MECInferenceEmbeddingBagCollection.load(artifact)


def test_int8_weight_dtype_over_a_float_blob_is_refused(artifact: Path) -> None:
    # A signed manifest that calls t_b's float32 rows int8 row-wise: refused, not misread.
    edit_manifest(artifact, lambda m: table_entry(m, "t_b").update(weight_dtype="int8"))
    with pytest.raises(ArtifactError, match=r"table 't_b' tensor 'weight' dtype is 'float32', "
                                            r"expected uint8 \(weight_dtype int8\)"):
        MECInferenceEmbeddingBagCollection.load(artifact)


def test_an_int8_blob_of_other_width_is_refused(tmp_path: Path) -> None:
    export_model(make_mec(), tmp_path / "art", weight_dtype="int8")
    blob = tmp_path / "art" / "tables" / "t_b.safetensors"
    save_file({"weight": torch.zeros(7, 8, dtype=torch.uint8)}, str(blob))  # no scale, bias

    def edit(manifest: dict) -> None:
        table_entry(manifest, "t_b").update(blob_bytes=blob.stat().st_size,
                                            sha256=sha256_file(blob))

    edit_manifest(tmp_path / "art", edit)
    with pytest.raises(ArtifactError, match=r"t_b.*tensor 'weight' is torch.uint8 \[7, 8\], "
                                            r"manifest says uint8 \[7, 16\]"):
        MECInferenceEmbeddingBagCollection.load(tmp_path / "art")


@pytest.mark.parametrize("where", ["compressed", "unknown"])
def test_a_wrong_weight_dtype_field_is_refused(artifact: Path, where: str) -> None:
    table, value = ("t_a", "fp32") if where == "compressed" else ("t_b", "int4")
    edit_manifest(artifact, lambda m: table_entry(m, table).update(weight_dtype=value))
    expected = "null for a compressed table" if where == "compressed" else "one of"
    with pytest.raises(ArtifactError, match=rf"table '{table}' weight_dtype is '{value}', "
                                            rf"expected {expected}"):
        MECInferenceEmbeddingBagCollection.load(artifact)


def kjt_with(a_ids: list[int]) -> KeyedJaggedTensor:
    """Batch 1: feature a holds ``a_ids``, every other feature one valid id."""
    return KeyedJaggedTensor(
        keys=["a", "b", "c", "d", "e"],
        values=torch.tensor([*a_ids, 1, 2, 3, 4]),
        lengths=torch.tensor([len(a_ids), 1, 1, 1, 1]),
    )


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad_id", [500, -1])
def test_out_of_range_id_raises_naming_table_id_rows_and_feature(artifact: Path, bad_id: int,
                                                                  fused: bool) -> None:
    serving = MECInferenceEmbeddingBagCollection.load(artifact, fused=fused)
    message = rf"table 't_a': id {bad_id} out of range \[0, 500\) in feature 'a'"
    with pytest.raises(ValueError, match=message):
        serving(kjt_with([3, bad_id]))
    with pytest.raises(Exception, match=message):
        script_model(serving)(kjt_with([3, bad_id]))


@pytest.mark.parametrize("fused", [True, False])
def test_reserved_policy_serves_out_of_range_ids_as_the_last_row(artifact: Path,
                                                                 fused: bool) -> None:
    serving = MECInferenceEmbeddingBagCollection.load(artifact, unknown_id_policy="reserved",
                                                      fused=fused)
    out = serving(kjt_with([3, 500, -7])).values()
    ref = serving(kjt_with([3, 499, 499])).values()
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert not torch.equal(out, serving(kjt_with([3, 0, 0])).values())


def test_unknown_policy_is_refused(artifact: Path) -> None:
    with pytest.raises(ValueError, match="unknown_id_policy must be one of"):
        MECInferenceEmbeddingBagCollection.load(artifact, unknown_id_policy="zero")
