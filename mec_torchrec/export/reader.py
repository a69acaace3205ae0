"""Read and check a serving artifact: every blob is verified against the manifest before use.

Blobs are opened with safetensors' ``safe_open``, which maps the file (``UntypedStorage.from_file``)
and hands out tensors that view the mapping: no copy and no pickle, and several serving processes
share the page cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mec_torchrec.export.format import (
    MANIFEST,
    ROWWISE_EXTRA_BYTES,
    ArtifactError,
    Manifest,
    TableEntry,
    dtype_from_name,
    sha256_file,
)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of the artifact folder ``path`` (format, version and checksum checked)."""
    file = Path(path) / MANIFEST
    if not file.exists():
        raise ArtifactError(f"{path}: no {MANIFEST} (not an artifact, or an interrupted export)")
    return Manifest.from_json(file.read_text(), where=str(file))


def expected_shapes(table: TableEntry, where: str) -> dict[str, list[int]]:
    """The tensor shapes the table's configs imply (the manifest's entries must agree);
    ``where`` names the table and its blob in errors."""
    n, d = table.num_embeddings, table.embedding_dim
    if not table.compressed:
        return {"weight": [n, d + ROWWISE_EXTRA_BYTES] if table.weight_dtype == "int8" else [n, d]}
    num_subspaces, k = table.num_subspaces, table.codebook_size
    assert num_subspaces is not None and k is not None
    if d % num_subspaces:
        raise ArtifactError(f"{where}: dim {d} not divisible by L={num_subspaces}")
    shapes = {"codes": [n, num_subspaces], "codebooks": [num_subspaces, k, d // num_subspaces]}
    if table.codebook_dtype == "int8":
        shapes.update(codebooks_scale=[num_subspaces, k], codebooks_bias=[num_subspaces, k])
    return shapes


def read_table(
    root: Path, table: TableEntry, verify: bool, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors of one table's blob, mapped from disk and checked.

    Raises:
        ArtifactError: the blob is missing, has another size than the manifest says (truncated),
            fails its sha256 (with ``verify``), is not a readable safetensors file, or holds
            tensors of other names, dtypes or shapes than the manifest and configs imply.
    """
    blob = root / table.blob
    where = f"table {table.name!r} ({blob})"
    if not blob.is_file():
        raise ArtifactError(f"{where}: blob is missing")
    size = blob.stat().st_size
    if size != table.blob_bytes:
        raise ArtifactError(
            f"{where}: {size} bytes on disk, manifest says {table.blob_bytes} (truncated or replaced)"
        )
    if verify and (digest := sha256_file(blob)) != table.sha256:
        raise ArtifactError(f"{where}: sha256 {digest} does not match the manifest's {table.sha256}")
    expected = expected_shapes(table, where)
    if {k: v.shape for k, v in table.tensors.items()} != expected:
        raise ArtifactError(
            f"{where}: manifest lists tensors {({k: v.shape for k, v in table.tensors.items()})}, "
            f"its configs imply {expected}"
        )
    try:
        with safe_open(str(blob), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    except SafetensorError as e:
        raise ArtifactError(f"{where}: unreadable safetensors file ({e})") from e
    if sorted(tensors) != sorted(expected):
        raise ArtifactError(f"{where}: blob holds {sorted(tensors)}, expected {sorted(expected)}")
    for name, entry in table.tensors.items():
        got = tensors[name]
        if list(got.shape) != entry.shape or got.dtype != dtype_from_name(entry.dtype):
            raise ArtifactError(
                f"{where}: tensor {name!r} is {got.dtype} {list(got.shape)}, manifest says "
                f"{entry.dtype} {entry.shape}"
            )
    if table.compressed:
        codes = tensors["codes"]
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= table.codebook_size):
            raise ArtifactError(f"{where}: codes outside [0, {table.codebook_size})")
    device = torch.device(device)
    return {k: v if device.type == "cpu" else v.to(device) for k, v in tensors.items()}
