"""Atomic writes: an artifact or checkpoint is either complete at its final path or absent.

Also the checks that fail a job early rather than after hours of work: an output folder that is
not writable or lacks the space its artifacts need, and a full disk while writing (the temporary
file is removed and the error names the path and the bytes).
"""

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class StorageError(OSError):
    """An output folder that cannot take the job's artifacts (unwritable, too little space)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def disk_full_error(path: Path, needed: int | None, written: int) -> StorageError:
    """The error for ENOSPC/EDQUOT while writing ``path``, naming it and the bytes at stake."""
    what = f"{needed:,} bytes needed" if needed is not None else f"failed after {written:,} bytes"
    return StorageError(
        errno.ENOSPC,
        f"{path}: no space left on device ({what}, {_free_bytes(path):,} bytes free); "
        "the partial write was removed and nothing at that path changed",
    )


def check_output_dir(path: str | os.PathLike, needed_bytes: int = 0, what: str = "") -> None:
    """Fail early unless ``path`` (created if absent) is writable and has ``needed_bytes`` free.

    Writability is probed by writing and removing a file (permission bits do not tell the whole
    story: read-only mounts, immutable folders, ACLs). ``what`` says what the bytes are for.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=folder)
        try:
            os.write(fd, b"0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise disk_full_error(folder, max(needed_bytes, 1), 0) from e
        raise StorageError(
            e.errno, f"{folder}: output folder is not writable ({e.strerror})"
        ) from e
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise StorageError(
            errno.ENOSPC,
            f"{folder}: {free:,} bytes free, but {what or 'the job'} needs at least "
            f"{needed_bytes:,} bytes",
        )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, nbytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it is fsynced and renamed onto it.

    On error the temporary file is removed and ``path`` is left as it was; a full disk raises
    :class:`StorageError` naming ``path`` and ``nbytes`` (the size to write, when known).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as e:
        if is_disk_full(e) and not isinstance(e, StorageError):
            written = tmp.stat().st_size if tmp.exists() else 0
            tmp.unlink(missing_ok=True)
            raise disk_full_error(final, nbytes, written) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path, nbytes=len(data)) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is ENOSPC or EDQUOT."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def temp_dir_for(path: str | os.PathLike) -> Path:
    """A new temporary folder beside ``path``, to fill and then :func:`commit_dir` onto it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


def stale_temp_dirs(path: str | os.PathLike) -> list[Path]:
    """Temporary folders left beside ``path`` by writers that were killed before committing."""
    final = Path(path)
    return sorted(final.parent.glob(f".{final.name}.*.tmp"))


def commit_dir(
    tmp: str | os.PathLike, path: str | os.PathLike, previous: str | os.PathLike | None = None
) -> None:
    """Rename the finished folder ``tmp`` onto ``path`` (fsynced: durable once this returns).

    An existing ``path`` is moved aside first and deleted only after the new folder is in place,
    so a crash leaves either the old or the new folder complete (plus a stale ``.old`` to remove).
    With ``previous``, the old folder is kept there instead (replacing what ``previous`` held):
    the last two versions stay on disk.
    """
    tmp, final = Path(tmp), Path(path)
    _fsync_dir(tmp)
    old = Path(previous) if previous is not None else final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if previous is None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success :func:`commit_dir` puts it there.

    On error the temporary folder is removed; a full disk raises :class:`StorageError` naming
    ``path`` and the bytes written before it filled up.
    """
    final = Path(path)
    tmp = temp_dir_for(final)
    try:
        yield tmp
        commit_dir(tmp, final)
    except OSError as e:
        if is_disk_full(e) and not isinstance(e, StorageError):
            written = _tree_bytes(tmp) if tmp.exists() else 0
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_full_error(final, None, written) from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
