"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

CRITEO_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo_sample.csv"


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[..., Path]:
    """Write a dataset spec YAML into ``tmp_path`` from keyword fields; returns its path."""

    def write(name: str = "spec.yaml", **fields: object) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump({"name": "test", **fields}))
        return path

    return write
