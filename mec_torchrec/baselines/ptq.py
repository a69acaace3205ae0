"""TorchRec's post-training row-wise quantization of an EBC, and its bytes as FBGEMM stores them."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchrec.inference.modules import quantize_inference_model
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

# What quantize_inference_model calls each storage type.
PTQ_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "int8": torch.qint8,
    "int4": torch.quint4x2,
    "int2": torch.quint2x4,
}


def quantize_ebc(ebc: EmbeddingBagCollection, dtype: str) -> QuantEmbeddingBagCollection:
    """A torchrec quantized EBC of a copy of ``ebc`` with every table stored as ``dtype``.

    ``dtype`` is one of ``PTQ_DTYPES``: fp16 rows, or int8 / int4 / int2 rows with a per-row
    fp16 scale and bias (FBGEMM's fused row-wise layout). Goes through
    ``quantize_inference_model``, the path a TorchRec user takes for serving.
    """
    if dtype not in PTQ_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(PTQ_DTYPES)}, got {dtype!r}")
    holder = nn.Module()
    holder.ebc = copy.deepcopy(ebc)
    quantized = quantize_inference_model(holder, quantization_dtype=PTQ_DTYPES[dtype])
    return quantized.ebc


def stored_bytes(qebc: QuantEmbeddingBagCollection) -> int:
    """Bytes of the table weights a quantized EBC's FBGEMM kernels hold.

    Each row takes ``round_up(D * bits / 8 + 4, 16)`` bytes for the int types (fp16 scale and
    bias, rows aligned to 16 bytes) and ``round_up(2 * D, 16)`` for fp16: at D = 64, int8 80,
    int4 48, int2 32 bytes, against 256 in fp32.
    """
    total = 0
    for tbe in qebc.tbes:
        module = tbe[0] if isinstance(tbe, tuple) else tbe
        for name in ("weights_host", "weights_dev", "weights_uvm"):
            weights = getattr(module, name, None)
            if isinstance(weights, torch.Tensor):
                total += weights.numel() * weights.element_size()
    return total
