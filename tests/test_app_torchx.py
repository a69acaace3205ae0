"""The DLRM app end to end: 2 processes launched by TorchX on a tiny spec leave a full report.

Also: a single process (no torchrun) resumes a finished stage from its checkpoint.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY_SPEC = """
data: {data}
model: {{embedding_dim: 16, dense_arch_layer_sizes: [16], over_arch_layer_sizes: [16, 1]}}
compression:
  num_subspaces: 4
  codebook_size: 16
  min_rows: 1000
  quantizer: {{epochs: 2, sample_size: 4000, seed: 0}}
training: {{batch_size: 256, eval_batch_size: 1024, epochs: 1, eval_every: 0.5}}
retrain:
  batch_size: 256
  eval_batch_size: 1024
  epochs: 1
  eval_every: 0.5
  variants: [warm, cold]
"""


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    subprocess.run(
        [sys.executable, "-m", "mec_torchrec.cli", "data", "synth", "--out", str(root / "data"),
         "--rows", "12000", "--scale", "0.001", "--quiet"],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    spec = root / "job.yaml"
    spec.write_text(TINY_SPEC.format(data=root / "data" / "dataset.yaml"))
    return spec


def env() -> dict[str, str]:
    # torchx's ddp component calls `torchrun` by name: find the venv's.
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_torchx_two_process_job_writes_report_with_every_figure(
    tiny_spec: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cmd = [str(BIN / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
           "apps/components.py:dlrm_mec", "--spec", str(tiny_spec), "--out", str(out), "-j", "1x2"]  # fmt: skip
    proc = subprocess.run(
        cmd, check=False, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())

    for model in ("baseline", "mec", "mec_no_retrain"):
        assert 0.5 < report[model]["auc"] <= 1.0, (model, report[model])
        assert 0.0 < report[model]["logloss"] < 1.0
    assert set(report["mec_variants"]) == {"warm", "cold"}
    assert report["mec"]["variant"] == "warm"
    assert set(report["seconds"]) == {"pretrain", "compress", "train"}

    tables = report["mec"]["tables"]
    assert tables, "tables with >= min_rows ids must be compressed"
    for name, t in tables.items():
        assert set(t) == {"rows", "dim", "num_subspaces", "codebook_size", "full_bytes", "bytes",
                          "ratio"}  # fmt: skip
        assert t["rows"] >= 1000 and t["dim"] == 16
        assert t["full_bytes"] == t["rows"] * 16 * 4
        # uint8 codes (K = 16) plus fp32 codebooks: codes are counted.
        assert t["bytes"] == t["rows"] * 4 + 4 * 16 * 4 * 4, name
        assert t["ratio"] == pytest.approx(t["full_bytes"] / t["bytes"])
    small = report["uncompressed_tables"]
    assert report["mec"]["embedding_bytes"] == (
        sum(t["bytes"] for t in tables.values()) + sum(t["bytes"] for t in small.values())
    )
    assert report["baseline"]["embedding_bytes"] == (
        sum(t["full_bytes"] for t in tables.values()) + sum(t["bytes"] for t in small.values())
    )
    assert report["compression_ratio"] == pytest.approx(
        report["baseline"]["embedding_bytes"] / report["mec"]["embedding_bytes"]
    )
    assert report["compression_ratio_compressed_tables"] > report["compression_ratio"]
    for plot in ("eval_curves.png", "table_bytes.png", "code_usage.png"):
        assert (out / plot).read_bytes().startswith(b"\x89PNG"), plot
    assert "MEC, retrained (warm)" in proc.stdout + proc.stderr


def test_single_process_run_resumes_a_finished_stage_from_its_checkpoint(
    tiny_spec: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "apps.dlrm.main", "--spec", str(tiny_spec), "--out", str(out),
           "--stage", "pretrain"]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, env=env(), check=True, capture_output=True, timeout=300)
    first = json.loads((out / "pretrain" / "result.json").read_text())
    (out / "pretrain" / "result.json").unlink()
    proc = subprocess.run([*cmd, "--resume"], check=False, cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[pretrain] resumed at epoch 1 step 0" in proc.stderr
    again = json.loads((out / "pretrain" / "result.json").read_text())
    assert again["history"] == first["history"]
    assert again["test"]["auc"] == pytest.approx(first["test"]["auc"], abs=1e-6)


def test_a_stage_run_alone_without_its_inputs_is_a_clear_error(
    tiny_spec: Path, tmp_path: Path
) -> None:
    cmd = [sys.executable, "-m", "apps.dlrm.main", "--spec", str(tiny_spec),
           "--out", str(tmp_path / "run"), "--stage", "train"]  # fmt: skip
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env(), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--stage train needs" in proc.stderr and "pretrain/best" in proc.stderr


def test_compress_resume_quantizes_only_the_tables_not_done(
    tiny_spec: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    base = [sys.executable, "-m", "apps.dlrm.main", "--spec", str(tiny_spec), "--out", str(out)]
    for stage in ("pretrain", "compress"):
        subprocess.run([*base, "--stage", stage], cwd=ROOT, env=env(), check=True,
                       capture_output=True, timeout=300)  # fmt: skip
    done = sorted((out / "compress").glob("t_*.safetensors"))
    assert len(done) >= 2
    kept, redo = done[0], done[1]
    kept_mtime = kept.stat().st_mtime_ns
    redo.unlink()
    redo.with_suffix(".json").unlink()
    (out / "compress" / "result.json").unlink()
    subprocess.run([*base, "--stage", "compress", "--resume"], cwd=ROOT, env=env(), check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    assert kept.stat().st_mtime_ns == kept_mtime
    assert redo.exists()
    result = json.loads((out / "compress" / "result.json").read_text())
    assert set(result["tables"]) == {p.stem for p in done}
