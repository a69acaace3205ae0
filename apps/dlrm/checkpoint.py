"""Atomic, resumable checkpoints of a sharded model with torch.distributed.checkpoint.

Every rank writes its shards into one temporary folder that rank 0 created; rank 0 renames it
onto the final path only after all ranks finished, so a checkpoint folder is complete or absent.
``progress.json`` beside the shards holds the loop counters (epoch, step, best AUC, history).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from apps.dlrm.model import Env
from mec_torchrec.io import atomic_dir

PROGRESS = "progress.json"


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save(path: Path, state: dict[str, Any], env: Env, progress: dict | None = None) -> None:
    """Write ``state`` (tensors, ShardedTensors, nested dicts) from all ranks; atomic."""
    if env.is_main:
        with atomic_dir(path) as tmp:
            _broadcast(str(tmp))
            dcp.save(state, checkpoint_id=tmp)
            dist.barrier()
            if progress is not None:
                (tmp / PROGRESS).write_text(json.dumps(progress, indent=1))
    else:
        tmp = Path(_broadcast(None))
        dcp.save(state, checkpoint_id=tmp)
        dist.barrier()
    # Nobody goes on (and possibly reads the checkpoint) before the rename is done.
    dist.barrier()


def load(path: Path, state: dict[str, Any]) -> dict | None:
    """Fill ``state`` in place from ``path`` (every rank reads its own shards); returns progress."""
    dcp.load(state, checkpoint_id=path)
    progress = path / PROGRESS
    return json.loads(progress.read_text()) if progress.exists() else None


def load_local(path: Path, state: dict[str, Any]) -> None:
    """Fill plain (unsharded) tensors from a sharded checkpoint in this process alone.

    Used to read whole tables or dense weights on one rank without the other ranks taking part.
    """
    dcp.load(state, checkpoint_id=path, no_dist=True)


def exists(path: Path) -> bool:
    return (path / ".metadata").exists()
