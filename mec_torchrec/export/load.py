"""Concurrent load check of a serving module: many threads, one module, a bounded time.

A serving process runs one module for many request threads. ``load_test`` does that on a fixed set
of requests whose single-threaded outputs are computed first, then lets ``threads`` threads call
the module round-robin over the requests for ``seconds``, and checks every output against the
reference bit for bit (the forward is deterministic, so any difference is a race). It returns the
count of requests, errors and mismatches and the latency percentiles, and never raises for a
failing request: a load test that stops at the first error hides how many there were.

    result = load_test(serving, requests, threads=4, seconds=5.0)
    assert result.ok, result.first_failure
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

Forward = Callable[[KeyedJaggedTensor], object]


@dataclass
class LoadResult:
    """What a load test saw: request counts, failures, and per-request latency (seconds)."""

    threads: int
    seconds: float
    requests: int = 0
    errors: int = 0
    mismatches: int = 0
    first_failure: str | None = None
    latencies: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.requests > 0 and self.errors == 0 and self.mismatches == 0

    def percentile(self, q: float) -> float:
        """The q-quantile (0..1) of the latencies, nearest rank; 0.0 when nothing was served."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def summary(self) -> dict[str, float | int | str | None]:
        return {
            "threads": self.threads,
            "seconds": self.seconds,
            "requests": self.requests,
            "requests_per_s": self.requests / self.seconds if self.seconds else 0.0,
            "errors": self.errors,
            "mismatches": self.mismatches,
            "p50_ms": self.percentile(0.5) * 1e3,
            "p90_ms": self.percentile(0.9) * 1e3,
            "p99_ms": self.percentile(0.99) * 1e3,
            "max_ms": max(self.latencies, default=0.0) * 1e3,
            "first_failure": self.first_failure,
        }


def _values(output: object) -> torch.Tensor:
    """The tensor a serving forward returns (a KeyedTensor's values, or the tensor itself)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.values()  # type: ignore[attr-defined]


def _difference(request: int, thread: int, out: torch.Tensor, expected: torch.Tensor) -> str:
    where = f"request {request} (thread {thread}): output differs from the single-threaded one"
    if out.shape != expected.shape:
        return f"{where}: shape {tuple(out.shape)} instead of {tuple(expected.shape)}"
    return f"{where} by up to {float((out - expected).abs().max()):.3g}"


def load_test(
    forward: Forward,
    requests: Sequence[KeyedJaggedTensor],
    threads: int,
    seconds: float,
) -> LoadResult:
    """Call ``forward`` from ``threads`` threads for ``seconds``; compare with single-threaded.

    Thread t starts at request t and steps through ``requests`` cyclically, so threads serve
    different requests at the same moment. Runs under ``torch.inference_mode``.
    """
    if threads < 1 or seconds <= 0 or not requests:
        raise ValueError(
            f"load_test needs threads >= 1, seconds > 0 and at least one request; got "
            f"threads={threads}, seconds={seconds}, {len(requests)} requests"
        )
    with torch.inference_mode():
        reference = [_values(forward(kjt)).clone() for kjt in requests]
    result = LoadResult(threads=threads, seconds=seconds)
    lock = threading.Lock()
    deadline: list[float] = []
    # The clock starts when every thread is ready, so slow thread start-up does not eat the time.
    start_gate = threading.Barrier(
        threads, action=lambda: deadline.append(time.perf_counter() + seconds)
    )

    def worker(index: int) -> None:
        latencies: list[float] = []
        served = errors = mismatches = 0
        failure: str | None = None
        start_gate.wait()
        with torch.inference_mode():
            i = index
            while time.perf_counter() < deadline[0]:
                kjt = requests[i % len(requests)]
                t0 = time.perf_counter()
                try:
                    out = _values(forward(kjt))
                except Exception:  # noqa: BLE001 - counted and reported, the test goes on
                    errors += 1
                    failure = failure or f"request {i % len(requests)}: {traceback.format_exc()}"
                else:
                    latencies.append(time.perf_counter() - t0)
                    expected = reference[i % len(requests)]
                    if not torch.equal(out, expected):
                        mismatches += 1
                        failure = failure or _difference(i % len(requests), index, out, expected)
                served += 1
                i += 1
        with lock:
            result.requests += served
            result.errors += errors
            result.mismatches += mismatches
            result.latencies.extend(latencies)
            if failure and result.first_failure is None:
                result.first_failure = failure

    pool = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return result
