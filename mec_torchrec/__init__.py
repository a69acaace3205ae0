"""MEC for TorchRec: product-quantized embedding tables (codes + small trainable codebooks).

The public names are imported lazily so that ``import mec_torchrec`` stays cheap and a command
that needs only the data layer does not pay for torchrec's import.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CompressedTable": "mec_torchrec.quantize",
    "MECQuantizer": "mec_torchrec.quantize",
    "PQQuantizer": "mec_torchrec.quantize",
    "MECEmbeddingBagCollection": "mec_torchrec.modules",
    "MECTableConfig": "mec_torchrec.modules",
    "MECInferenceEmbeddingBagCollection": "mec_torchrec.export",
    "export_model": "mec_torchrec.export",
}

__all__ = [
    "CompressedTable",
    "MECEmbeddingBagCollection",
    "MECInferenceEmbeddingBagCollection",
    "MECQuantizer",
    "MECTableConfig",
    "PQQuantizer",
    "__version__",
    "export_model",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mec_torchrec' has no attribute {name!r}")
    return getattr(import_module(module), name)
