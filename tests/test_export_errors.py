"""A broken artifact is refused with a message naming the file and the mismatch; bad ids too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_export import make_mec
from torchrec import KeyedJaggedTensor

from mec_torchrec.export import ArtifactError, MECInferenceEmbeddingBagCollection, export_model
from mec_torchrec.export.format import sha256_file
from mec_torchrec.export.program import script_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    export_model(make_mec(), tmp_path / "art", "int8")
    return tmp_path / "art"


def edit_manifest(root: Path, edit) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
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


def test_unknown_format_version_is_refused(artifact: Path) -> None:
    edit_manifest(artifact, lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format_version 99 is not supported"):
        MECInferenceEmbeddingBagCollection.load(artifact)


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
