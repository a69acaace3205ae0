"""Filling MEC codes and codebooks after DistributedModelParallel has wrapped the model.

DMP zero-fills buffers that were on the meta device and the sharded EBC initialises its own
shards instead of copying the unsharded module's weights, so a model planned and wrapped from a
meta-device (or freshly built) MEC module serves zero codes and random codebooks until loaded.
"""

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from mec_torchrec.distributed.sharder import ShardedMECEmbeddingBagCollection
from mec_torchrec.modules import MECEmbeddingBagCollection

if TYPE_CHECKING:
    from mec_torchrec.quantize import CompressedTable

MECState = Mapping[str, torch.Tensor] | Mapping[str, "CompressedTable"]


def _owners(model: nn.Module, table: str) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(m, (ShardedMECEmbeddingBagCollection, MECEmbeddingBagCollection))
        and hasattr(m.codes, table)
    ]


def load_mec_state(model: nn.Module, state: MECState) -> None:
    """Loads MEC codes and codebooks into a DMP-wrapped (or plain) model.

    Args:
        model: a `DistributedModelParallel` model (or any module holding MEC modules, sharded or
            not).
        state: either an unsharded state dict of the whole model (e.g. the reference model's
            `state_dict()`: codes, codebooks and every other parameter, spliced into the local
            shards), loaded strictly; or `{table_name: CompressedTable}` for compressed tables,
            each filled through the owning module's `load_compressed`.

    Raises:
        KeyError: a table name matches no MEC module, or more than one.
        RuntimeError: a state dict does not match the model (missing or unexpected keys).
    """
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == len(state):
        model.load_state_dict(dict(tensors), strict=True)
        return
    if tensors:
        raise TypeError("state mixes tensors and compressed tables; pass one kind")
    for name, table in state.items():
        owners = _owners(model, name)
        if len(owners) != 1:
            raise KeyError(
                f"compressed table {name!r} belongs to {len(owners)} MEC modules; expected one"
            )
        owners[0].load_compressed(name, table)
