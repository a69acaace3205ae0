"""Serving export: a checksummed, memory-mappable artifact and the module that serves it.

export_model(model_or_state_or_checkpoint, "out/serving", codebook_dtype="fp16")
serving = MECInferenceEmbeddingBagCollection.load("out/serving")
program = export_program(model_with_serving, (dense, kjt))     # torch.export, dynamic sizes
scripted = script_model(model_with_serving)                    # torchrec fx + TorchScript
load_ops()          # before torch.jit.load where the C++ kernels' extension is not built yet
load_test(serving, requests, threads=4, seconds=5.0)             # concurrent-request check
quantize_inference_model(model, quantization_mapping=MEC_QUANT_MAPPING)
"""

from mec_torchrec.export.format import ArtifactError, Manifest, manifest_checksum
from mec_torchrec.export.inference import MECInferenceEmbeddingBagCollection
from mec_torchrec.export.kernels import load_ops
from mec_torchrec.export.load import LoadResult, load_test
from mec_torchrec.export.program import export_program, script_model
from mec_torchrec.export.quant import MEC_QUANT_MAPPING
from mec_torchrec.export.reader import read_manifest
from mec_torchrec.export.writer import export_model

__all__ = [
    "MEC_QUANT_MAPPING",
    "ArtifactError",
    "LoadResult",
    "MECInferenceEmbeddingBagCollection",
    "Manifest",
    "export_model",
    "export_program",
    "load_ops",
    "load_test",
    "manifest_checksum",
    "read_manifest",
    "script_model",
]
