"""The serving artifact's on-disk format: manifest.json + one safetensors blob per table.

An artifact is a folder::

    manifest.json          format name and version, per table: configs, tensors, blob size + sha256;
                           its own sha256 (manifest_sha256, since version 2)
    tables/<table>.safetensors

A compressed table's blob holds ``codes`` [N, L] (uint8 / int16 / int32) and ``codebooks``
[L, K, D / L] in the chosen codebook dtype (``fp32``, ``fp16``, or ``int8`` with per-row
``codebooks_scale`` / ``codebooks_bias`` float32 [L, K]); a full table's blob holds ``weight``,
[N, D] float32 (``weight_dtype`` ``fp32``) or [N, D + 8] uint8 (``int8``: each row's D bytes,
then its float32 scale and bias, PyTorch's and FBGEMM's byte row-wise layout, which the serving
module keeps as is and pools with ``torch.ops.quantized.embedding_bag_byte_rowwise_offsets``). Everything a reader needs to check a blob is in the manifest, so a blob that is
missing, truncated, altered or of another shape is refused before any tensor is used; and the
manifest's own checksum makes an edited manifest refused too, not served as written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

FORMAT = "mec_torchrec.serving"
# Version 2 adds manifest_sha256; version 1 manifests (written before it) still load without one.
# Version 3 adds weight_dtype (full tables stored int8 row-wise); without it a full table is fp32.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
CHECKSUM = "manifest_sha256"
CODEBOOK_DTYPES = ("fp32", "fp16", "int8")
WEIGHT_DTYPES = ("fp32", "int8")
# int8 row-wise rows end with a float32 scale and a float32 bias (the byte row-wise layout).
ROWWISE_EXTRA_BYTES = 8

_DTYPES = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "float16": torch.float16,
    "float32": torch.float32,
}


class ArtifactError(ValueError):
    """An artifact that cannot be served: names the file and what was expected."""


def manifest_checksum(raw: dict) -> str:
    """Hex sha256 of a manifest's canonical JSON: every field but ``manifest_sha256``, keys
    sorted, no spaces (``json.dumps(..., sort_keys=True, separators=(",", ":"))``).

    The writer stores it as ``manifest_sha256``; a tool that edits a manifest on purpose signs it
    again with ``raw["manifest_sha256"] = manifest_checksum(raw)``.
    """
    fields = {k: v for k, v in raw.items() if k != CHECKSUM}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.uint8`` -> ``"uint8"`` (the names the manifest uses)."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} cannot be stored in an artifact")


def dtype_from_name(name: str) -> torch.dtype:
    """``"uint8"`` -> ``torch.uint8``; raises ArtifactError for names outside the format."""
    if not isinstance(name, str) or name not in _DTYPES:
        raise ArtifactError(f"unknown dtype {name!r} (known: {sorted(_DTYPES)})")
    return _DTYPES[name]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor inside a blob: its dtype and shape as the manifest promises them."""

    dtype: str
    shape: list[int]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * dtype_from_name(self.dtype).itemsize


@dataclass(frozen=True)
class TableEntry:
    """One table of the artifact (compressed when ``num_subspaces`` is not None).

    ``codebook_dtype`` and ``code_dtype`` are None for a full table, ``weight_dtype`` (``fp32``
    or ``int8``; None in manifests before version 3: fp32) for a compressed one; ``blob_bytes``
    and ``sha256`` describe the blob file as written.
    """

    name: str
    feature_names: list[str]
    num_embeddings: int
    embedding_dim: int
    pooling: str
    blob: str
    blob_bytes: int
    sha256: str
    tensors: dict[str, TensorEntry]
    num_subspaces: int | None = None
    codebook_size: int | None = None
    code_dtype: str | None = None
    codebook_dtype: str | None = None
    weight_dtype: str | None = None

    @property
    def compressed(self) -> bool:
        return self.num_subspaces is not None

    @property
    def full_bytes(self) -> int:
        """Bytes of the uncompressed fp32 table, N * D * 4."""
        return self.num_embeddings * self.embedding_dim * 4

    @property
    def tensor_bytes(self) -> int:
        """Bytes of the tensors (codes counted; excludes the blob's small JSON header)."""
        return sum(t.nbytes for t in self.tensors.values())


@dataclass(frozen=True)
class Manifest:
    """The artifact's table of contents (``manifest.json``).

    ``manifest_sha256`` is :func:`manifest_checksum` of the other fields, as read or written
    (None for a version 1 manifest, which carries none).
    """

    tables: list[TableEntry]
    is_weighted: bool = False
    unknown_id_policy: str = "error"
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    source: dict[str, Any] = field(default_factory=dict)
    manifest_sha256: str | None = None

    def signed(self) -> Manifest:
        """This manifest with ``manifest_sha256`` set to the checksum of its other fields."""
        return replace(self, manifest_sha256=manifest_checksum(asdict(self)))

    def to_json(self) -> str:
        """The manifest as written: every field, signed."""
        return json.dumps(asdict(self.signed()), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> Manifest:
        """Parse and check the format name, the version and the checksum before anything else.

        A version 2 manifest must carry ``manifest_sha256`` and match it, so an edit is refused,
        not served as written. Version 1 manifests (written before the checksum) load without
        one; a checksum present is checked whatever the version (a version 2 manifest edited
        to say 1 still fails it).

        Raises:
            ArtifactError: not JSON, another format, a version this code does not read, a
                checksum missing or not matching the content, or a field missing.
        """
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ArtifactError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("format") != FORMAT:
            raise ArtifactError(f"{where}: format {raw.get('format')!r}, expected {FORMAT!r}")
        version = raw.get("format_version")
        if not _is_int(version, 0) or version not in READABLE_VERSIONS:
            raise ArtifactError(
                f"{where}: format_version {version!r} is not supported "
                f"(this code reads versions {list(READABLE_VERSIONS)})"
            )
        _check_checksum(raw, version, where)
        try:
            tables = [
                TableEntry(
                    **{
                        **t,
                        "tensors": {k: TensorEntry(**v) for k, v in t["tensors"].items()},
                    }
                )
                for t in raw["tables"]
            ]
            manifest = cls(
                tables=tables,
                is_weighted=raw["is_weighted"],
                unknown_id_policy=raw["unknown_id_policy"],
                format_version=version,
                source=raw.get("source", {}),
                manifest_sha256=raw.get(CHECKSUM),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"{where}: malformed manifest ({e!r})") from e
        manifest.check(where)
        return manifest

    def check(self, where: str = MANIFEST) -> None:
        """Every field of the right type and in range, names unique, blobs inside the folder.

        These catch a manifest written wrong; an edit of a written one is caught before, by
        its checksum (:meth:`from_json`), except in a version 1 manifest, which has none.

        Raises:
            ArtifactError: naming the table and field.
        """

        def need(ok: bool, field: str, value: object, expected: str) -> None:
            if not ok:
                raise ArtifactError(f"{where}: {field} is {value!r}, expected {expected}")

        need(isinstance(self.is_weighted, bool), "is_weighted", self.is_weighted, "true or false")
        need(self.unknown_id_policy in ("error", "reserved"), "unknown_id_policy",
             self.unknown_id_policy, "'error' or 'reserved'")  # fmt: skip
        need(isinstance(self.tables, list) and len(self.tables) > 0, "tables", self.tables,
             "a non-empty list")  # fmt: skip
        for t in self.tables:
            _check_table(t, f"table {t.name!r}", need)
        names = [t.name for t in self.tables]
        features = [f for t in self.tables for f in t.feature_names]
        need(len(set(names)) == len(names), "the list of table names", names, "unique names")
        need(len(set(features)) == len(features), "the list of feature names", features,
             "unique names")  # fmt: skip

    def total_bytes(self) -> int:
        """Sum of the blobs' sizes on disk (what serving maps)."""
        return sum(t.blob_bytes for t in self.tables)

    def full_bytes(self) -> int:
        """What the same tables take as fp32."""
        return sum(t.full_bytes for t in self.tables)


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_checksum(raw: dict, version: int, where: str) -> None:
    """``manifest_sha256`` is required from version 2 and checked wherever present."""
    stored = raw.get(CHECKSUM)
    if stored is None:
        if version >= 2:
            raise ArtifactError(f"{where}: no {CHECKSUM} (format_version {version} requires one)")
        return
    if stored != (computed := manifest_checksum(raw)):
        raise ArtifactError(
            f"{where}: {CHECKSUM} {stored} does not match its content ({computed}): "
            f"edited or damaged"
        )


def _check_table(t: TableEntry, table: str, need) -> None:
    """One table entry's fields (``need(ok, field, value, expected)`` raises)."""
    need(isinstance(t.name, str) and t.name != "", "a table name", t.name, "a non-empty string")
    need(isinstance(t.feature_names, list) and len(t.feature_names) > 0
         and all(isinstance(f, str) for f in t.feature_names),
         f"{table} feature_names", t.feature_names, "a non-empty list of strings")  # fmt: skip
    need(_is_int(t.num_embeddings, 1), f"{table} num_embeddings", t.num_embeddings, "an int >= 1")
    need(_is_int(t.embedding_dim, 1), f"{table} embedding_dim", t.embedding_dim, "an int >= 1")
    need(t.pooling in ("SUM", "MEAN"), f"{table} pooling", t.pooling, "'SUM' or 'MEAN'")
    blob = Path(t.blob) if isinstance(t.blob, str) else None
    need(blob is not None and not blob.is_absolute() and ".." not in blob.parts,
         f"{table} blob", t.blob, "a path inside the artifact folder")  # fmt: skip
    need(_is_int(t.blob_bytes, 0), f"{table} blob_bytes", t.blob_bytes, "an int >= 0")
    need(isinstance(t.sha256, str) and len(t.sha256) == 64, f"{table} sha256", t.sha256,
         "64 hex digits")  # fmt: skip
    need(isinstance(t.tensors, dict), f"{table} tensors", t.tensors, "a mapping")
    for name, entry in t.tensors.items():
        need(isinstance(entry.dtype, str) and entry.dtype in _DTYPES,
             f"{table} tensor {name!r} dtype", entry.dtype,
             f"one of {sorted(_DTYPES)}")  # fmt: skip
        need(isinstance(entry.shape, list) and all(_is_int(n, 0) for n in entry.shape),
             f"{table} tensor {name!r} shape", entry.shape, "a list of ints >= 0")  # fmt: skip
    if t.num_subspaces is None:
        need(t.codebook_size is None and t.code_dtype is None and t.codebook_dtype is None,
             f"{table} codebook_size / code_dtype / codebook_dtype",
             (t.codebook_size, t.code_dtype, t.codebook_dtype),
             "null for a full table")  # fmt: skip
        need(t.weight_dtype is None or t.weight_dtype in WEIGHT_DTYPES, f"{table} weight_dtype",
             t.weight_dtype, f"one of {list(WEIGHT_DTYPES)}")  # fmt: skip
        weight = t.tensors.get("weight")
        stored = "uint8" if t.weight_dtype == "int8" else "float32"
        need(weight is not None and weight.dtype == stored, f"{table} tensor 'weight' dtype",
             weight.dtype if weight is not None else None,
             f"{stored} (weight_dtype {t.weight_dtype or 'fp32'})")  # fmt: skip
        return
    need(t.weight_dtype is None, f"{table} weight_dtype", t.weight_dtype,
         "null for a compressed table")  # fmt: skip
    need(_is_int(t.num_subspaces, 1), f"{table} num_subspaces", t.num_subspaces, "an int >= 1")
    need(_is_int(t.codebook_size, 1), f"{table} codebook_size", t.codebook_size, "an int >= 1")
    need(t.codebook_dtype in CODEBOOK_DTYPES, f"{table} codebook_dtype", t.codebook_dtype,
         f"one of {list(CODEBOOK_DTYPES)}")  # fmt: skip
    codes = t.tensors.get("codes")
    need(codes is not None and t.code_dtype == codes.dtype, f"{table} code_dtype", t.code_dtype,
         "the dtype of its codes tensor")  # fmt: skip


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def encode_codebooks(codebooks: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """Codebooks [L, K, d] float32 -> the tensors stored for ``dtype``.

    ``int8`` is row-wise affine: each codebook row r is stored as q in [-128, 127] with
    ``r ~= q * scale + bias`` (scale = (max - min) / 255, bias = min + 128 * scale), float32
    scale and bias per row, so the error per element is at most scale / 2.
    """
    if dtype == "fp32":
        return {"codebooks": codebooks.float().contiguous()}
    if dtype == "fp16":
        return {"codebooks": codebooks.half().contiguous()}
    if dtype != "int8":
        raise ValueError(f"codebook dtype must be one of {CODEBOOK_DTYPES}, got {dtype!r}")
    x = codebooks.float()
    lo, hi = x.amin(dim=-1), x.amax(dim=-1)
    scale = ((hi - lo) / 255.0).clamp(min=torch.finfo(torch.float32).tiny)
    bias = lo + 128.0 * scale
    q = torch.round((x - bias.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(-128, 127)
    return {
        "codebooks": q.to(torch.int8).contiguous(),
        "codebooks_scale": scale.contiguous(),
        "codebooks_bias": bias.contiguous(),
    }


def encode_weight(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    """A full table [N, D] float -> the ``weight`` tensor stored for ``dtype``.

    ``int8`` is PyTorch's byte row-wise quantization
    (``torch.ops.quantized.embedding_bag_byte_prepack``): [N, D + 8] uint8, each row's D bytes q
    with ``w ~= q * scale + bias`` (scale = (max - min) / 255, bias = min), then scale and bias
    as float32, so the error per element is at most scale / 2.
    """
    if dtype == "fp32":
        return weight.detach().float().contiguous()
    if dtype != "int8":
        raise ValueError(f"weight dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")
    return torch.ops.quantized.embedding_bag_byte_prepack(weight.detach().float().contiguous())


def decode_weight(weight: torch.Tensor) -> torch.Tensor:
    """The float32 [N, D] table a stored ``weight`` stands for (int8 row-wise or float)."""
    if weight.dtype != torch.uint8:
        return weight.float()
    dim = weight.shape[1] - ROWWISE_EXTRA_BYTES
    scale_bias = weight[:, dim:].contiguous().view(torch.float32)
    return weight[:, :dim].float() * scale_bias[:, :1] + scale_bias[:, 1:]


def decode_codebooks(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 codebooks [L, K, d] the stored tensors stand for (inverse of encode)."""
    codebooks = tensors["codebooks"]
    if codebooks.dtype == torch.int8:
        scale, bias = tensors["codebooks_scale"], tensors["codebooks_bias"]
        return codebooks.float() * scale.unsqueeze(-1) + bias.unsqueeze(-1)
    return codebooks.float()
