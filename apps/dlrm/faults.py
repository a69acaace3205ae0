"""A fault hook for recovery tests: a rank SIGKILLs itself at a chosen point of a stage.

Inert unless ``MEC_FAULT_KILL_AFTER_STEPS`` is set, to ``<stage>:<steps>[:<rank>]`` (rank 0 when
left out). That rank kills itself once it has done ``steps`` steps of ``stage``: training steps
of ``pretrain``, ``train_warm`` or ``train_cold``; tables saved by that rank in ``compress``. It
fires on the first attempt only (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so the attempt that
torchrun's agent restarts runs through.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

ENV = "MEC_FAULT_KILL_AFTER_STEPS"


@functools.cache
def target() -> tuple[str, int, int] | None:
    """The (stage, steps, rank) the hook fires at, or None when unset or on a restarted attempt."""
    value = os.environ.get(ENV, "")
    if not value or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    parts = value.split(":")
    try:
        if len(parts) not in (2, 3) or not parts[0]:
            raise ValueError
        return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise ValueError(f"{ENV}={value!r}: expected <stage>:<steps>[:<rank>]") from None


def kill_point(stage: str, steps: int, rank: int) -> None:
    """Called after each step: SIGKILL this process if the hook targets this stage and step."""
    if target() == (stage, steps, rank):
        print(f"{ENV}: rank {rank} kills itself after {steps} steps of {stage}", file=sys.stderr)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
