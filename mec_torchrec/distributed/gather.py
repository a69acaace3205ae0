"""Gathering a sharded model's state whole on one rank, e.g. to export it from a live job.

`torch.distributed.checkpoint` gathers shards when a checkpoint is read (`mec export
--checkpoint` does that); this is the same without a checkpoint on disk.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor


def gathered_state_dict(
    model: nn.Module, dst: int = 0, prefix: str = ""
) -> dict[str, torch.Tensor] | None:
    """`model.state_dict()` entries under `prefix` with every `ShardedTensor` (sharded codes,
    codebooks, full tables) gathered into a full CPU tensor on rank `dst`.

    Collective: every rank of the shards' process group calls it. Returns the state on `dst`,
    None elsewhere. Feed it to `mec_torchrec.export.export_model` on `dst`.
    """
    rank = dist.get_rank()
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if not key.startswith(prefix):
            continue
        if isinstance(value, ShardedTensor):
            full = torch.empty(tuple(value.size()), dtype=value.dtype) if rank == dst else None
            value.gather(dst=dst, out=full)
            if full is not None:
                out[key] = full
        elif rank == dst:
            out[key] = value.detach().cpu()
    return out if rank == dst else None
