"""Atomic, verified, resumable checkpoints of a sharded model with torch.distributed.checkpoint.

A save: rank 0 makes a temporary folder beside the final path (and writes ``progress.json``, the
loop counters, into it); every rank writes its shards there; all ranks hash the files in parallel
and rank 0 writes ``manifest.json`` (size and sha256 of every file) **last**, then renames the
folder onto the final path. So a checkpoint folder is complete or absent, and its manifest is the
mark of a complete one. With ``keep_previous`` the folder it replaces stays as ``<path>.prev``.

A load checks every file against the manifest first. :func:`latest` returns the newest of
``path`` and ``<path>.prev`` that passes, so a truncated or bit-flipped checkpoint falls back to
the one before it. All functions here but :func:`load_local` and :func:`exists` are collective.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from mec_torchrec.io import (
    atomic_write_text,
    commit_dir,
    disk_full_error,
    file_sha256,
    is_disk_full,
    stale_temp_dirs,
    temp_dir_for,
)

PROGRESS = "progress.json"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete or does not match its manifest, or a failed commit."""


def previous(path: Path) -> Path:
    """Where :func:`save` with ``keep_previous`` keeps the checkpoint that ``path`` held before."""
    return path.with_name(f"{path.name}.prev")


def _on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 alone and share its result; if it fails, every rank raises."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks hear of it
            error = e
    box = [(result, None if error is None else f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    result, message = box[0]
    if message is not None:
        raise CheckpointError(f"rank 0 failed: {message}")
    return result


def _hash_files(folder: Path, names: list[str]) -> dict[str, list | str]:
    """``{name: [size, sha256]}`` (or a read error) for ``names``; each rank hashes a share."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine: dict[str, list | str] = {}
    for name in names[rank::world]:
        try:
            mine[name] = [(folder / name).stat().st_size, file_sha256(folder / name)]
        except OSError as e:
            mine[name] = f"unreadable ({e.strerror})"
    parts: list[dict] = [{}] * world
    dist.all_gather_object(parts, mine)
    return {name: found for part in parts for name, found in part.items()}


def _local_bytes(state: Any) -> int:
    """Bytes of the tensors this rank holds in ``state`` (its shards of sharded tensors)."""
    if isinstance(state, dict):
        return sum(_local_bytes(v) for v in state.values())
    if hasattr(state, "local_shards"):
        return sum(s.tensor.nbytes for s in state.local_shards())
    if hasattr(state, "to_local"):
        return state.to_local().nbytes
    return state.nbytes if isinstance(state, torch.Tensor) else 0


def save(
    path: Path,
    state: dict[str, Any],
    progress: dict | None = None,
    keep_previous: bool = False,
) -> None:
    """Write ``state`` (tensors, ShardedTensors, nested dicts) from all ranks; atomic.

    A full disk raises :class:`~mec_torchrec.io.StorageError` on every rank, naming ``path`` and
    the bytes this rank had to write; ``path`` (and ``<path>.prev``) are then as they were.
    """

    def begin() -> str:
        for stale in stale_temp_dirs(path):  # left by a process killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp = temp_dir_for(path)
        try:
            if progress is not None:
                atomic_write_text(tmp / PROGRESS, json.dumps(progress, indent=1))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return str(tmp)

    tmp = Path(_on_main(begin))
    try:
        dcp.save(state, checkpoint_id=tmp)
    except CheckpointException as e:  # raised on every rank when any rank failed
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if any(is_disk_full(exc) for exc, _ in e.failures.values()):
            raise disk_full_error(path, _local_bytes(state), 0) from None
        raise
    names = _on_main(lambda: sorted(p.name for p in tmp.iterdir()))
    files = _hash_files(tmp, names)

    def commit() -> None:
        try:
            unreadable = {n: f for n, f in files.items() if isinstance(f, str)}
            if unreadable:
                raise CheckpointError(f"{path}: files just written are {unreadable}")
            atomic_write_text(tmp / MANIFEST, json.dumps({"files": files}, indent=1))
            commit_dir(tmp, path, previous(path) if keep_previous else None)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    _on_main(commit)


def verify(path: Path) -> list[str]:
    """What makes the checkpoint at ``path`` unusable: [] when every file matches its manifest."""

    def read_manifest() -> tuple[dict | None, str | None]:
        manifest = path / MANIFEST
        if not manifest.exists():
            return None, f"{manifest} is missing (the checkpoint is incomplete)"
        try:
            files = json.loads(manifest.read_text())["files"]
            if not isinstance(files, dict):
                raise TypeError(f"'files' is a {type(files).__name__}, expected an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            return None, f"{manifest} is unreadable ({e})"
        return files, None

    files, problem = _on_main(read_manifest)
    if problem is not None:
        return [problem]
    found = _hash_files(path, sorted(files))
    problems = []
    for name, (size, sha256) in sorted(files.items()):
        got = found[name]
        if isinstance(got, str):
            problems.append(f"{path / name} is {got}")
        elif got[0] != size:
            problems.append(f"{path / name} has {got[0]} bytes, its manifest says {size}")
        elif got[1] != sha256:
            problems.append(f"{path / name} does not match its manifest's sha256 (corrupted)")
    return problems


def latest(path: Path, log: Callable[[str], None]) -> Path | None:
    """The newest intact checkpoint of ``path`` and ``<path>.prev``; None if neither is.

    An unusable one is moved to ``<name>.corrupt`` (kept for inspection), so that the next save
    does not keep it as ``.prev`` in place of the intact one.
    """
    for candidate in (path, previous(path)):
        if not _on_main(candidate.exists):
            continue
        problems = verify(candidate)
        if not problems:
            return candidate
        aside = candidate.with_name(f"{candidate.name}.corrupt")
        log(f"checkpoint {candidate} is unusable, moved to {aside.name}: {'; '.join(problems)}")

        def move_aside(candidate: Path = candidate, aside: Path = aside) -> None:
            shutil.rmtree(aside, ignore_errors=True)
            candidate.rename(aside)

        _on_main(move_aside)
    return None


def load(path: Path, state: dict[str, Any]) -> dict | None:
    """Fill ``state`` in place from ``path`` (every rank reads its own shards); returns progress.

    Raises :class:`CheckpointError` naming the bad files if the checkpoint fails verification.
    """
    require(path)
    dcp.load(state, checkpoint_id=path)
    progress = path / PROGRESS
    return json.loads(progress.read_text()) if progress.exists() else None


def require(path: Path) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint at ``path`` is complete and intact."""
    problems = verify(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} is unusable: {'; '.join(problems)}")


def load_local(path: Path, state: dict[str, Any]) -> None:
    """Fill plain (unsharded) tensors from a sharded checkpoint in this process alone.

    Used to read whole tables or dense weights on one rank without the other ranks taking part;
    the caller runs :func:`require` on all ranks first.
    """
    dcp.load(state, checkpoint_id=path, no_dist=True)


def exists(path: Path) -> bool:
    """Whether a committed checkpoint is at ``path`` (its manifest is written last)."""
    return (path / MANIFEST).exists()
