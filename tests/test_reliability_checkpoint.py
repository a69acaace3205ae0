"""Checkpoints survive corruption, failed writes and a process killed mid-save.

Real torch.distributed.checkpoint on 2 gloo ranks (each rank writes its own shard file): the
manifest is written last, ``last.prev`` keeps the checkpoint before, a bit-flipped or truncated
``last`` is detected and the previous one used, a disk that fills up mid-write leaves both as they
were. A process SIGKILLed between writing its shards and committing leaves the old checkpoint
complete, and the next save removes its leftovers.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_harness import CheckRecorder, assert_check, run_ranks

ROOT = Path(__file__).resolve().parents[1]

CHECKS = [
    "manifest_lists_every_file_and_previous_is_kept",
    "bit_flipped_latest_falls_back_to_previous",
    "truncated_latest_falls_back_to_previous",
    "no_intact_checkpoint_means_none",
    "loading_a_corrupted_checkpoint_names_the_file",
    "disk_full_mid_write_leaves_checkpoints_unchanged",
]


def _state(rank: int, step: int) -> dict:
    # "shared" is written once (rank 0); f"rank{r}" by its rank: both ranks write a shard file.
    return {
        "shared": torch.full((64,), float(step)),
        f"rank{rank}": torch.arange(256, dtype=torch.float32) * step + rank,
    }


def _checkpoint_body(rec: CheckRecorder, root: str) -> None:
    from apps.dlrm import checkpoint
    from mec_torchrec.io import StorageError, stale_temp_dirs

    rank = dist.get_rank()
    last = Path(root) / "last"
    logged: list[str] = []

    def save(step: int) -> None:
        checkpoint.save(last, _state(rank, step), progress={"step": step}, keep_previous=True)

    def step_of(path: Path) -> int:
        state = {k: torch.zeros_like(v) for k, v in _state(rank, 0).items()}
        progress = checkpoint.load(path, state)
        assert torch.equal(state[f"rank{rank}"], _state(rank, progress["step"])[f"rank{rank}"])
        assert torch.equal(state["shared"], _state(rank, progress["step"])["shared"])
        return progress["step"]

    def damage(path: Path, how: str) -> None:
        if rank == 0:
            if how == "flip":
                data = bytearray(path.read_bytes())
                data[len(data) // 2] ^= 0x01
                path.write_bytes(bytes(data))
            else:
                os.truncate(path, path.stat().st_size - 7)
        dist.barrier()

    def manifest_lists_every_file_and_previous_is_kept() -> None:
        for step in (1, 2, 3):
            save(step)
        files = json.loads((last / checkpoint.MANIFEST).read_text())["files"]
        assert set(files) == {".metadata", "__0_0.distcp", "__1_0.distcp", "progress.json"}
        assert {p.name for p in last.iterdir()} == set(files) | {checkpoint.MANIFEST}
        assert checkpoint.verify(last) == [] and checkpoint.verify(checkpoint.previous(last)) == []
        assert step_of(last) == 3 and step_of(checkpoint.previous(last)) == 2
        assert stale_temp_dirs(last) == []

    def bit_flipped_latest_falls_back_to_previous() -> None:
        damage(last / "__1_0.distcp", "flip")  # written by rank 1, checked by whichever rank
        found = checkpoint.latest(last, logged.append)
        assert found == checkpoint.previous(last) and step_of(found) == 2
        if rank == 0:
            assert "__1_0.distcp does not match its manifest's sha256" in logged[-1], logged
        # Moved aside: the next save must not keep it as `.prev` in place of the intact one.
        assert not last.exists() and (Path(root) / "last.corrupt").is_dir()
        save(4)
        assert step_of(last) == 4 and step_of(checkpoint.previous(last)) == 2

    def truncated_latest_falls_back_to_previous() -> None:
        damage(last / ".metadata", "truncate")
        found = checkpoint.latest(last, logged.append)
        assert found == checkpoint.previous(last) and step_of(found) == 2
        if rank == 0:
            assert "its manifest says" in logged[-1], logged

    def no_intact_checkpoint_means_none() -> None:
        damage(checkpoint.previous(last) / "__0_0.distcp", "flip")
        assert checkpoint.latest(last, logged.append) is None

    def loading_a_corrupted_checkpoint_names_the_file() -> None:
        best = Path(root) / "best"
        checkpoint.save(best, _state(rank, 7))
        damage(best / "__0_0.distcp", "truncate")
        with pytest.raises(checkpoint.CheckpointError, match=r"best/__0_0\.distcp has \d+ bytes"):
            checkpoint.load(best, _state(rank, 0))

    def disk_full_mid_write_leaves_checkpoints_unchanged() -> None:
        from torch.distributed.checkpoint import filesystem

        for step in (5, 6):
            save(step)
        before = {p: sorted(q.name for q in p.iterdir()) for p in Path(root).iterdir()}
        dist.barrier()  # every rank has listed before rank 0 makes the next temporary folder
        real = filesystem._write_item

        def fill_up(transforms, stream, *args, **kwargs):  # rank 1's disk fills mid-file
            stream.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")

        if rank == 1:
            filesystem._write_item = fill_up
        try:
            with pytest.raises(
                StorageError, match=r"last: no space left on device \(\d[\d,]* bytes"
            ):
                save(7)
        finally:
            filesystem._write_item = real
        dist.barrier()
        after = {p: sorted(q.name for q in p.iterdir()) for p in Path(root).iterdir()}
        assert after == before, (before, after)
        assert step_of(last) == 6 and step_of(checkpoint.previous(last)) == 5
        assert stale_temp_dirs(last) == []

    for name in CHECKS:
        rec.run(name, locals()[name])
        dist.barrier()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    root = tmp_path_factory.mktemp("ckpt")
    return run_ranks(_checkpoint_body, 2, root / "results", str(root / "work"))


@pytest.mark.parametrize("check", CHECKS)
def test_checkpoint_on_two_ranks(results: list[dict[str, str]], check: str) -> None:
    assert_check(results, check)


SAVE_SCRIPT = """
import json, os, signal, sys, torch, torch.distributed as dist
from pathlib import Path
from apps.dlrm import checkpoint

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
last, steps, kill = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")], sys.argv[3]
print(json.dumps(checkpoint.verify(last) if last.exists() else None), flush=True)
for step in steps:
    if kill == "kill" and step == steps[-1]:  # die after shards and manifest, before the rename
        checkpoint.commit_dir = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save(last, {"w": torch.full((1000,), float(step))}, progress={"step": step},
                    keep_previous=True)
dist.destroy_process_group()
"""


def test_a_process_killed_mid_save_leaves_the_last_checkpoint_complete(tmp_path: Path) -> None:
    from apps.dlrm import checkpoint
    from mec_torchrec.io import stale_temp_dirs

    last = tmp_path / "last"

    def save(steps: str, mode: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-c", SAVE_SCRIPT, str(last), steps, mode]
        return subprocess.run(
            cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
        )

    killed = save("1,2", "kill")
    assert killed.returncode == -9, killed.stderr[-2000:]
    (leftover,) = stale_temp_dirs(last)
    assert (leftover / checkpoint.MANIFEST).exists()  # all written, only the rename missing
    assert not checkpoint.previous(last).exists()
    assert json.loads((last / checkpoint.PROGRESS).read_text()) == {"step": 1}

    again = save("3", "ok")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.splitlines()[0]) == []  # step 1's checkpoint verified intact
    assert stale_temp_dirs(last) == []
    assert json.loads((last / checkpoint.PROGRESS).read_text()) == {"step": 3}
    assert json.loads((checkpoint.previous(last) / checkpoint.PROGRESS).read_text()) == {"step": 1}
