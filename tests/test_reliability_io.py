"""Unwritable or full output folders: clear errors before work is lost, and no partial files.

The full disk is simulated (a write raises ENOSPC part-way); the unwritable folder is real:
``chmod 555`` for a normal user, ``chattr +i`` when running as root (root ignores permission bits).
"""

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mec_torchrec.io import StorageError, atomic_dir, atomic_write_bytes, check_output_dir

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """Make ``folder`` unwritable for this process, whatever its user."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: permission bits do not stop root")
    made = subprocess.run(["chattr", "+i", str(folder)], check=False, capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"running as root and chattr +i failed: {made.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def _fill_up_after(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    """Every Path.write_bytes writes ``nbytes`` and then fails as a full disk does."""

    def write_bytes(self: Path, data: bytes) -> int:
        with open(self, "wb") as f:
            f.write(data[:nbytes])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_a_full_disk_during_an_atomic_write_names_the_path_and_bytes_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "table.bin"
    target.write_text("previous version")
    _fill_up_after(monkeypatch, 1000)
    with pytest.raises(StorageError) as info:
        atomic_write_bytes(target, b"x" * 5000)
    assert info.value.errno == errno.ENOSPC
    assert f"{target}: no space left on device (5,000 bytes needed" in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["table.bin"]
    monkeypatch.undo()
    assert target.read_text() == "previous version"


def test_a_full_disk_while_filling_an_atomic_dir_keeps_the_old_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "export"
    target.mkdir()
    (target / "model.pt").write_text("old")
    _fill_up_after(monkeypatch, 300)
    full = pytest.raises(StorageError, match=r"export: no space left on device \(failed after 300")
    with full, atomic_dir(target) as tmp:
        (tmp / "model.pt").write_bytes(b"y" * 1000)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (target / "model.pt").read_text() == "old"


def test_an_unwritable_output_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with (
        unwritable(out),
        pytest.raises(StorageError, match=f"{out}: output folder is not writable"),
    ):
        check_output_dir(out)
    with unwritable(tmp_path), pytest.raises(StorageError, match="run: output folder is not"):
        check_output_dir(tmp_path / "run")  # cannot even be created
    check_output_dir(out)  # writable again: no error, and no probe file left behind
    assert list(out.iterdir()) == []


def test_too_little_free_space_is_an_error_with_both_figures(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(StorageError, match=r"bytes free, but stages pretrain needs at least") as e:
        check_output_dir(tmp_path, 2 * free + 10**12, "stages pretrain")
    assert e.value.errno == errno.ENOSPC and f"{2 * free + 10**12:,}" in str(e.value)
    check_output_dir(tmp_path, 1)


def test_the_app_stops_before_any_work_when_its_output_folder_is_unwritable(
    tmp_path: Path,
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(f"data: {tmp_path / 'no_data' / 'dataset.yaml'}\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    cmd = [sys.executable, "-m", "apps.dlrm.main", "--spec", str(spec), "--out",
           str(locked / "run")]  # fmt: skip
    with unwritable(locked):
        proc = subprocess.run(
            cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{locked / 'run'}: output folder is not writable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(locked.iterdir()) == []
