"""Per-table MEC settings and the byte accounting that goes with them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class MECTableConfig:
    """How one embedding table is product-quantized.

    A table of N rows and dimension D becomes ``codes`` [N, L] (one integer in [0, K) per row and
    subspace) plus L codebooks of K rows x D / L columns; row j is the concatenation of
    ``codebook[l][codes[j, l]]`` over l.

    Args:
        num_subspaces: L, the number of codes per row; must divide the table's embedding_dim.
        codebook_size: K, the number of entries per codebook (K <= 256 stores uint8 codes).

    Example::

        MECTableConfig(num_subspaces=4, codebook_size=256)  # D=64: 4 x 16-wide codebooks
    """

    num_subspaces: int
    codebook_size: int

    def __post_init__(self) -> None:
        if self.num_subspaces < 1:
            raise ValueError(f"num_subspaces must be >= 1, got {self.num_subspaces}")
        if self.codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {self.codebook_size}")


class TableBytes(NamedTuple):
    """Resident bytes of one table: ``full`` as an fp32 table, ``stored`` as the module holds it.

    For a compressed table ``stored`` = codes (N * L * code bytes) + codebooks (L * K * D/L * 4);
    for a full table ``stored == full``.
    """

    full: int
    stored: int

    @property
    def ratio(self) -> float:
        """full / stored (codes counted)."""
        return self.full / self.stored
