"""TorchRec's inference quantization path: MECEmbeddingBagCollection -> the serving module.

``quantize_inference_model(model, quantization_mapping=MEC_QUANT_MAPPING)`` swaps every plain EBC
for torchrec's quantized one (as usual) and every MEC collection for a
:class:`MECInferenceEmbeddingBagCollection`. TorchRec converts children before parents, so by the
time a MEC collection is converted its inner ``codebooks`` EBC may already be a quantized EBC
(int8, fp16 or fp32 rows in FBGEMM's layout): its rows are read back from that layout. The MEC
module's own qconfig weight dtype picks the codebook storage (qint8/quint8 -> int8 row-wise,
float16 -> fp16, else fp32), so the served codebooks equal those of an artifact exported with the
same dtype; with int8 the full tables are also held int8 row-wise (as ``weight_dtype="int8"``).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.inference.modules import (
    DEFAULT_QUANT_MAPPING,
    trim_torch_package_prefix_from_typename,
)
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from mec_torchrec.export.format import decode_codebooks, encode_codebooks, encode_weight
from mec_torchrec.export.inference import MECInferenceEmbeddingBagCollection
from mec_torchrec.modules import MECEmbeddingBagCollection
from mec_torchrec.modules.layout import sub_name

_SCALE_BIAS_BYTES = 4  # FBGEMM int8 rows start with an fp16 scale and an fp16 bias


def inner_weights(codebooks: nn.Module) -> dict[str, torch.Tensor]:
    """Float32 weight of every table of a MEC module's inner EBC, plain or already quantized.

    Raises:
        ValueError: a quantized table of a data type this cannot read back (int4, int2).
    """
    if isinstance(codebooks, EmbeddingBagCollection):
        return {n: bag.weight.detach().float() for n, bag in codebooks.embedding_bags.items()}
    if not isinstance(codebooks, QuantEmbeddingBagCollection):
        raise TypeError(f"inner codebooks are a {type(codebooks).__name__}, expected an EBC")
    out = {}
    for config in codebooks.embedding_bag_configs():
        rows = codebooks.embedding_bags[config.name].weight  # uint8 [N, padded row bytes]
        dim = config.embedding_dim
        if config.data_type == DataType.INT8:
            scale_bias = rows[:, :_SCALE_BIAS_BYTES].contiguous().view(torch.float16).float()
            data = rows[:, _SCALE_BIAS_BYTES : _SCALE_BIAS_BYTES + dim].float()
            out[config.name] = data * scale_bias[:, :1] + scale_bias[:, 1:]
        elif config.data_type == DataType.FP16:
            out[config.name] = rows[:, : 2 * dim].contiguous().view(torch.float16).float()
        elif config.data_type == DataType.FP32:
            out[config.name] = rows[:, : 4 * dim].contiguous().view(torch.float32).clone()
        else:
            raise ValueError(
                f"codebook table {config.name!r} was quantized to {config.data_type.name}; "
                f"MEC serving reads int8, fp16 or fp32 codebooks"
            )
    return out


def codebook_dtype_of(module: nn.Module) -> str:
    """The codebook storage a module's qconfig asks for (fp32 without a qconfig)."""
    qconfig = getattr(module, "qconfig", None)
    if qconfig is None:
        return "fp32"
    dtype = qconfig.weight().dtype
    if dtype in (torch.qint8, torch.quint8, torch.int8, torch.uint8):
        return "int8"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float32:
        return "fp32"
    raise ValueError(f"MEC codebooks can be int8, fp16 or fp32, qconfig asks for {dtype}")


def from_mec_module(
    module: MECEmbeddingBagCollection, codebook_dtype: str | None = None
) -> MECInferenceEmbeddingBagCollection:
    """The serving module of a MEC collection (inner EBC plain or quantized already)."""
    dtype = codebook_dtype or codebook_dtype_of(module)
    weights = inner_weights(module.codebooks)
    compressed, full = {}, {}
    for config in module.embedding_bag_configs():
        if config.name in module.compression:
            subspaces = module.compression[config.name].num_subspaces
            stacked = torch.stack([weights[sub_name(config.name, s)] for s in range(subspaces)])
            codebooks = decode_codebooks(encode_codebooks(stacked, dtype))
            compressed[config.name] = (getattr(module.codes, config.name).detach(), codebooks)
        else:
            # int8: the full tables stay int8 in memory, as in torchrec's quantized EBC (its rows
            # re-encoded in PyTorch's byte row-wise layout, on the same min / max grid).
            weight = weights[config.name]
            full[config.name] = encode_weight(weight, "int8") if dtype == "int8" else weight
    return MECInferenceEmbeddingBagCollection(
        list(module.embedding_bag_configs()),
        compressed,
        full,
        is_weighted=module.is_weighted(),
        unknown_id_policy=module.unknown_id_policy,
    )


MEC_QUANT_MAPPING: dict[str, type[nn.Module]] = {
    **DEFAULT_QUANT_MAPPING,
    trim_torch_package_prefix_from_typename(
        torch.typename(MECEmbeddingBagCollection)
    ): MECInferenceEmbeddingBagCollection,
}
"""``quantize_inference_model``'s default mapping plus MEC collection -> serving module."""
