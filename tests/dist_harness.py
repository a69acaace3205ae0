"""Run a function on N gloo ranks in spawned processes, with a hard deadline.

Each rank runs a list of named checks; a failing check records its traceback instead of killing
the group, so one spawned group serves many tests (spawning and importing torchrec costs seconds
per process). Collectives time out after `COLLECTIVE_TIMEOUT_S`, and the whole group is killed at
the deadline, so a hang fails the test instead of blocking CI.
"""

import datetime
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60

Check = Callable[..., None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CheckRecorder:
    """Runs named checks on one rank and records 'ok' or the traceback for each."""

    def __init__(self) -> None:
        self.results: dict[str, str] = {}

    def run(self, name: str, check: Check, *args: Any) -> None:
        try:
            check(*args)
            self.results[name] = "ok"
        except Exception:  # noqa: BLE001 - the traceback is the test's failure message
            self.results[name] = traceback.format_exc()


def _entry(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    body: Callable[..., None],
    args: tuple[Any, ...],
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    recorder = CheckRecorder()
    try:
        body(recorder, *args)
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(recorder.results))
        dist.destroy_process_group()
    # The body finished and its results are on disk: skip interpreter teardown, where a native
    # thread left joinable by the stack (seen once in ~6 runs of the DCP tests) can call
    # std::terminate and turn a passed group into a SIGABRT. A body that raised still exits
    # non-zero above, and every check's outcome is read from the results file.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(
    body: Callable[..., None],
    world_size: int,
    out_dir: Path,
    *args: Any,
    timeout_s: float = 150.0,
) -> list[dict[str, str]]:
    """Runs `body(recorder, *args)` on `world_size` gloo ranks; returns each rank's check results.

    `body` must be a module-level function (it is pickled by reference into spawned processes).
    Raises TimeoutError if the group is not done in `timeout_s`; a crash outside a check
    re-raises with the child's traceback.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(
        _entry,
        args=(world_size, free_port(), str(out_dir), body, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    end = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, end - time.monotonic())):
        if time.monotonic() >= end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world_size}-rank group did not finish in {timeout_s:.0f} s")
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]


def assert_check(results: list[dict[str, str]], name: str) -> None:
    """Fails with every rank's traceback unless check `name` passed on all ranks."""
    failures = {
        rank: res.get(name, "check did not run") for rank, res in enumerate(results)
    }
    failures = {rank: msg for rank, msg in failures.items() if msg != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{msg}" for r, msg in failures.items())
