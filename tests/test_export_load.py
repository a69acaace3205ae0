"""The serving module under concurrent requests: no errors, outputs identical to one thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from test_export import make_kjt, make_mec, tables
from torchrec import KeyedJaggedTensor

from mec_torchrec.export import MECInferenceEmbeddingBagCollection, export_model, load_test

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per_table"])
def test_serving_module_under_concurrent_requests(tmp_path: Path, fused: bool) -> None:
    export_model(make_mec(), tmp_path / "art")
    serving = MECInferenceEmbeddingBagCollection.load(tmp_path / "art", fused=fused)
    requests = [make_kjt(tables(), batch=b, seed=s) for s, b in enumerate((1, 3, 8, 17, 32))]
    result = load_test(serving, requests, threads=4, seconds=1.0)
    assert result.ok, result.first_failure
    assert result.requests >= 4 * len(requests)  # every thread went round the requests
    assert len(result.latencies) == result.requests
    s = result.summary()
    assert 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"]


class _Racy(torch.nn.Module):
    """Shares one scratch buffer across calls: concurrent calls overwrite each other's work."""

    def __init__(self) -> None:
        super().__init__()
        self.scratch = torch.zeros(64)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        self.scratch.fill_(float(kjt.values().sum()))
        time.sleep(0.001)  # another thread's fill lands here
        return self.scratch.clone()


def test_load_test_catches_races_and_counts_errors() -> None:
    kjts = [
        KeyedJaggedTensor(keys=["a"], values=torch.tensor([v]), lengths=torch.tensor([1]))
        for v in range(8)
    ]
    racy = load_test(_Racy(), kjts, threads=4, seconds=0.5)
    assert racy.mismatches > 0 and not racy.ok
    assert "differs from the single-threaded one" in racy.first_failure

    calls = {"n": 0}
    lock = threading.Lock()

    def flaky(kjt: KeyedJaggedTensor) -> torch.Tensor:
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n > len(kjts) and n % 5 == 0:  # the reference pass (first len(kjts) calls) succeeds
            raise RuntimeError("backend unavailable")
        return kjt.values().float()

    flaky_result = load_test(flaky, kjts, threads=2, seconds=0.3)
    assert flaky_result.errors > 0 and not flaky_result.ok
    assert "backend unavailable" in flaky_result.first_failure
    assert flaky_result.requests == flaky_result.errors + len(flaky_result.latencies)


def test_load_test_refuses_an_empty_run() -> None:
    with pytest.raises(ValueError, match="at least one request"):
        load_test(lambda kjt: kjt, [], threads=1, seconds=1.0)
