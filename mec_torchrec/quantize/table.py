"""CompressedTable: the value object a quantizer produces and the TorchRec module serves.

A table of N rows and dimension D is stored as ``codes`` [N, L] (one small integer per row and
subspace) and ``codebooks`` [L, K, D / L] float32. Row ``j`` decodes to the concatenation
``codebooks[0, codes[j, 0]] | codebooks[1, codes[j, 1]] | ... | codebooks[L-1, codes[j, L-1]]``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mec_torchrec.io import atomic_path

_FORMAT = "mec_torchrec.CompressedTable"
# Version 2 adds a sha256 of the tensors and stats; version 1 files (no checksum) still load.
_VERSION = "2"
_READABLE_VERSIONS = ("1", "2")


class TableFileError(ValueError):
    """A CompressedTable file that cannot be loaded; the message names the file and the fault."""


def code_dtype(codebook_size: int) -> torch.dtype:
    """The smallest dtype that holds codes in ``[0, codebook_size)``.

    uint8 for K <= 256, int16 for K <= 32768, int32 up to 2**31 - 1.
    """
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    if codebook_size <= 2**8:
        return torch.uint8
    if codebook_size <= 2**15:
        return torch.int16
    if codebook_size <= 2**31 - 1:
        return torch.int32
    raise ValueError(f"codebook_size {codebook_size} does not fit int32 codes (max {2**31 - 1})")


class CompressedTable:
    """A product-quantized embedding table: ``codes`` [N, L] + ``codebooks`` [L, K, D / L].

    Args:
        codes: integer tensor [N, L] with values in [0, K). Any integer dtype is accepted and
            stored as the smallest dtype for K (see :func:`code_dtype`).
        codebooks: float tensor [L, K, D / L]; stored as float32.
        stats: optional JSON-serialisable dict of quality statistics (saved with the table).

    Memory (``nbytes``) counts both the codes and the codebooks; ``full_nbytes`` is N * D * 4, the
    fp32 table it replaces. The stats dict is metadata and is not counted.

    Example::

        >>> codes = torch.tensor([[0, 1], [1, 0], [1, 1]], dtype=torch.uint8)
        >>> codebooks = torch.arange(8, dtype=torch.float32).reshape(2, 2, 2)
        >>> t = CompressedTable(codes, codebooks)
        >>> t.decode(torch.tensor([0]))
        tensor([[0., 1., 6., 7.]])
    """

    def __init__(
        self, codes: torch.Tensor, codebooks: torch.Tensor, stats: dict[str, Any] | None = None
    ) -> None:
        if not isinstance(codebooks, torch.Tensor) or codebooks.dim() != 3:
            shape = tuple(codebooks.shape) if isinstance(codebooks, torch.Tensor) else None
            raise ValueError(f"codebooks must be a 3-D tensor [L, K, D/L], got shape {shape}")
        if not codebooks.is_floating_point():
            raise ValueError(f"codebooks must be floating point, got {codebooks.dtype}")
        num_subspaces, codebook_size, sub_dim = codebooks.shape
        if num_subspaces < 1 or codebook_size < 1 or sub_dim < 1:
            raise ValueError(f"codebooks shape {tuple(codebooks.shape)} has an empty dimension")
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else None
            raise ValueError(f"codes must be a 2-D tensor [N, L], got shape {shape}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.shape[1] != num_subspaces:
            raise ValueError(
                f"codes have {codes.shape[1]} subspaces but codebooks have {num_subspaces} "
                f"(codes {tuple(codes.shape)}, codebooks {tuple(codebooks.shape)})"
            )
        if codes.device != codebooks.device:
            raise ValueError(f"codes on {codes.device} but codebooks on {codebooks.device}")
        if not torch.isfinite(codebooks).all():
            raise ValueError("codebooks contain NaN or inf")
        if codes.numel() > 0:
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= codebook_size:
                raise ValueError(f"codes out of range [0, {codebook_size}): min {lo}, max {hi}")
        self.codes = codes.to(code_dtype(codebook_size)).contiguous()
        self.codebooks = codebooks.to(torch.float32).contiguous()
        self.stats: dict[str, Any] = dict(stats) if stats else {}

    @property
    def num_rows(self) -> int:
        """N, the number of rows (ids) in the table."""
        return self.codes.shape[0]

    @property
    def num_subspaces(self) -> int:
        """L, the number of subspaces (codes per row)."""
        return self.codebooks.shape[0]

    @property
    def codebook_size(self) -> int:
        """K, the number of entries per codebook."""
        return self.codebooks.shape[1]

    @property
    def dim(self) -> int:
        """D, the embedding dimension (L * D / L)."""
        return self.codebooks.shape[0] * self.codebooks.shape[2]

    def decode(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rows as the module serves them: concatenated codebook entries.

        Args:
            ids: optional int tensor [n] of row ids; all N rows when None.

        Returns:
            float32 tensor [n, D] on the codebooks' device.
        """
        codes = self.codes if ids is None else self.codes[ids.to(self.codes.device).long()]
        return decode_codes(codes, self.codebooks)

    @property
    def nbytes(self) -> int:
        """Bytes to serve the table: codes (N * L * code bytes) + codebooks (L * K * D/L * 4)."""
        codes_bytes = self.codes.numel() * self.codes.element_size()
        return codes_bytes + self.codebooks.numel() * self.codebooks.element_size()

    @property
    def full_nbytes(self) -> int:
        """Bytes of the uncompressed fp32 table, N * D * 4."""
        return self.num_rows * self.dim * 4

    @property
    def compression_ratio(self) -> float:
        """``full_nbytes / nbytes`` (codes counted)."""
        return self.full_nbytes / self.nbytes

    def to(self, device: torch.device | str) -> CompressedTable:
        """A copy with codes and codebooks on ``device``."""
        return CompressedTable(self.codes.to(device), self.codebooks.to(device), self.stats)

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (complete at ``path`` or absent).

        Tensors are stored as is (bit-exact); stats go into the header metadata as JSON.
        """
        stats = json.dumps(self.stats, sort_keys=True)
        tensors = {"codes": self.codes.cpu().contiguous(), "codebooks": self.codebooks.cpu()}
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "stats": stats,
            "sha256": _checksum(tensors["codes"], tensors["codebooks"], stats),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> CompressedTable:
        """Read a table written by :meth:`save`, checking its sha256 (version 2 files).

        Raises:
            FileNotFoundError: ``path`` does not exist.
            TableFileError: (a ``ValueError``) naming ``path``: not a readable safetensors file
                (truncated, corrupted), another format or an unknown version, tensors missing or
                of the wrong dtype or shape, codes outside [0, K), a checksum mismatch, or stats
                that are not a JSON object.
        """
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                names = sorted(f.keys())
                tensors = {k: f.get_tensor(k) for k in names if k in ("codes", "codebooks")}
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError) as e:
            raise TableFileError(f"{path}: not a readable safetensors file ({e})") from None
        if meta.get("format") != _FORMAT:
            raise TableFileError(
                f"{path}: not a CompressedTable file (format {meta.get('format')!r})"
            )
        version = meta.get("version")
        if version not in _READABLE_VERSIONS:
            raise TableFileError(
                f"{path}: unsupported CompressedTable version {version!r} "
                f"(this code reads {list(_READABLE_VERSIONS)})"
            )
        if names != ["codebooks", "codes"]:
            raise TableFileError(f"{path}: holds tensors {names}, expected ['codebooks', 'codes']")
        codes, codebooks = tensors["codes"], tensors["codebooks"]
        stats_text = meta.get("stats", "{}")
        expected = meta.get("sha256")
        if version != "1" and expected is None:
            raise TableFileError(f"{path}: version {version} file without its sha256")
        if expected is not None and _checksum(codes, codebooks, stats_text) != expected:
            raise TableFileError(
                f"{path}: sha256 of the tensors and stats does not match the "
                f"header's (corrupted file)"
            )
        try:
            stats = json.loads(stats_text)
        except json.JSONDecodeError as e:
            raise TableFileError(f"{path}: stats are not valid JSON ({e})") from None
        if not isinstance(stats, dict):
            raise TableFileError(f"{path}: stats must be a JSON object, got {type(stats).__name__}")
        try:
            table = cls(codes, codebooks, stats)
        except ValueError as e:
            raise TableFileError(f"{path}: {e}") from None
        return table if torch.device(device).type == "cpu" else table.to(device)

    def __repr__(self) -> str:
        return (
            f"CompressedTable(num_rows={self.num_rows}, dim={self.dim}, "
            f"num_subspaces={self.num_subspaces}, codebook_size={self.codebook_size}, "
            f"codes={self.codes.dtype}, ratio={self.compression_ratio:.1f}x)"
        )


def _checksum(codes: torch.Tensor, codebooks: torch.Tensor, stats: str) -> str:
    """Hex sha256 of both tensors (dtype, shape, bytes) and the stats JSON, as stored."""
    digest = hashlib.sha256()
    for name, tensor in (("codes", codes), ("codebooks", codebooks)):
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}\n".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    digest.update(stats.encode())
    return digest.hexdigest()


def decode_codes(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Concatenate codebook entries: codes [n, L] (any int dtype), codebooks [L, K, d] -> [n, L*d].

    This is the decoder the module serves; quantizers and tables share it.
    """
    num_subspaces, _, sub_dim = codebooks.shape
    idx = codes.to(device=codebooks.device, dtype=torch.long)
    # uint8 index tensors would be read as boolean masks, hence the explicit long cast above.
    picked = codebooks[torch.arange(num_subspaces, device=codebooks.device), idx]
    return picked.reshape(codes.shape[0], num_subspaces * sub_dim)
