"""Write a serving artifact (manifest + one safetensors blob per table), atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torchrec.modules.embedding_configs import PoolingType

from mec_torchrec.export import source as _source
from mec_torchrec.export.format import (
    CODEBOOK_DTYPES,
    MANIFEST,
    WEIGHT_DTYPES,
    Manifest,
    TableEntry,
    TensorEntry,
    dtype_name,
    encode_codebooks,
    encode_weight,
    sha256_file,
)
from mec_torchrec.io import atomic_dir


def export_model(
    source: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    path: str | os.PathLike,
    codebook_dtype: str = "fp32",
    *,
    weight_dtype: str = "fp32",
    feature_names: Mapping[str, list[str]] | None = None,
    pooling: Mapping[str, PoolingType] | None = None,
) -> Manifest:
    """Export the MEC tables of ``source`` into the artifact folder ``path`` (atomically).

    Args:
        source: a ``MECEmbeddingBagCollection``; a model holding exactly one (e.g. a DLRM); its
            state dict (any key prefix); or a checkpoint path: a ``torch.distributed.checkpoint``
            folder (the DLRM app's ``train_*/best``; sharded tables are gathered) or a
            ``torch.save`` file of a state dict.
        path: the artifact folder; replaced as a whole if it exists.
        codebook_dtype: ``"fp32"``, ``"fp16"`` or ``"int8"`` (row-wise scale and bias).
        weight_dtype: how the tables MEC did not compress are stored and served: ``"fp32"`` or
            ``"int8"`` (byte row-wise: D bytes + float32 scale and bias per row, 4x smaller at
            D = 128; the serving module pools them in that form).
        feature_names / pooling: per table, for state dicts and checkpoints, which carry no
            configs (default: table ``t_X`` serves feature ``X``, SUM pooling).

    Returns:
        The manifest as written (signed: ``manifest_sha256`` set).

    Example::

        export_model(dlrm, "out/serving", codebook_dtype="fp16")
        serving = MECInferenceEmbeddingBagCollection.load("out/serving")
    """
    if codebook_dtype not in CODEBOOK_DTYPES:
        raise ValueError(f"codebook_dtype must be one of {CODEBOOK_DTYPES}, got {codebook_dtype!r}")
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    tables = _source.resolve(source, feature_names, pooling)
    origin = source if isinstance(source, (str, os.PathLike)) else type(source).__name__
    return write_artifact(tables, path, codebook_dtype, {"from": str(origin)}, weight_dtype)


def write_artifact(
    tables: _source.ExportTables,
    path: str | os.PathLike,
    codebook_dtype: str = "fp32",
    source: dict | None = None,
    weight_dtype: str = "fp32",
) -> Manifest:
    """Write ``tables`` as an artifact at ``path``: blobs first, the manifest last, one rename."""
    entries = []
    with atomic_dir(path) as tmp:
        (tmp / "tables").mkdir()
        for config in tables.configs:
            blob = Path("tables") / f"{config.name}.safetensors"
            compressed = tables.compressed.get(config.name)
            if compressed is not None:
                tensors = {"codes": compressed.codes.cpu().contiguous()}
                tensors.update(encode_codebooks(compressed.codebooks.cpu(), codebook_dtype))
            else:
                tensors = {"weight": encode_weight(tables.full[config.name].cpu(), weight_dtype)}
            save_file(tensors, str(tmp / blob), metadata={"table": config.name})
            entries.append(
                TableEntry(
                    name=config.name,
                    feature_names=list(config.feature_names),
                    num_embeddings=config.num_embeddings,
                    embedding_dim=config.embedding_dim,
                    pooling=config.pooling.name,
                    blob=blob.as_posix(),
                    blob_bytes=(tmp / blob).stat().st_size,
                    sha256=sha256_file(tmp / blob),
                    tensors={
                        k: TensorEntry(dtype_name(v.dtype), list(v.shape)) for k, v in tensors.items()
                    },
                    num_subspaces=compressed.num_subspaces if compressed else None,
                    codebook_size=compressed.codebook_size if compressed else None,
                    code_dtype=dtype_name(compressed.codes.dtype) if compressed else None,
                    codebook_dtype=codebook_dtype if compressed else None,
                    weight_dtype=None if compressed else weight_dtype,
                )
            )
        manifest = Manifest(
            tables=entries,
            is_weighted=tables.is_weighted,
            unknown_id_policy=tables.unknown_id_policy,
            source=dict(source or {}),
        ).signed()
        (tmp / MANIFEST).write_text(manifest.to_json())
        for f in [tmp / MANIFEST, *(tmp / "tables").iterdir()]:
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    return manifest
