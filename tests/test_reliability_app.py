"""The DLRM app recovers from killed processes (real SIGKILLs, via MEC_FAULT_KILL_AFTER_STEPS).

Stage 2: a run (all stages) killed after 2 of its 3 tables is rerun with --resume; a table whose
input and file checksums match is skipped, a finished table whose file was damaged and the
unfinished one are quantized; a changed quantizer setting redoes every table.

Stage 3: a 2-process torchx job with ``--max_retries 1`` whose rank 1 is SIGKILLed at step 7
(after the step-5 checkpoint) is restarted by torchrun's agent, resumes from ``last`` and finishes
with the same evaluations and test metrics as an uninterrupted job, exactly: the data order is a
function of (seed, epoch, step) and the checkpoint holds model, optimizer and loop counters.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SPEC = """
data: {data}
model: {{embedding_dim: 16, dense_arch_layer_sizes: [16], over_arch_layer_sizes: [16, 1]}}
compression:
  num_subspaces: 4
  codebook_size: 16
  min_rows: 1300  # 3 tables
  quantizer: {{epochs: 1, sample_size: 2000, seed: {seed}}}
training: {{batch_size: 256, eval_batch_size: 1024, epochs: 1, eval_every: 0.5}}
retrain:
  batch_size: 256
  eval_batch_size: 1024
  epochs: 1
  eval_every: 0.25
  variants: [warm]
"""


def env(**extra: str) -> dict[str, str]:
    # torchx's ddp component calls `torchrun` by name: find the venv's.
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "MALLOC_MMAP_THRESHOLD_": "1000000000", **extra}


def app(
    spec: Path, out: Path, stage: str, *flags: str, **extra: str
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "apps.dlrm.main", "--spec", str(spec), "--out", str(out),
           "--stage", stage, *flags]  # fmt: skip
    return subprocess.run(
        cmd, check=False, cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=300
    )


def compress_log(stderr: str) -> dict[str, str]:
    """{table: what a resumed compress did}: 'skipped', or why it quantized the table."""
    done = {}
    for table, what in re.findall(r"\[compress\] (t_\w+): (.+)", stderr):
        if what.startswith("done already"):
            done[table] = "skipped"
        elif what.endswith(": quantizing"):
            done[table] = what.removesuffix(": quantizing")
    return done


@pytest.fixture(scope="module")
def compress_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Stages 1-2 killed after 2 tables, one finished file damaged, resumed; then a changed seed."""
    from mec_torchrec.cli import main as mec

    root = tmp_path_factory.mktemp("reliability")
    assert mec(["data", "synth", "--out", str(root / "data"), "--rows", "12000", "--scale",
                "0.001", "--quiet"]) == 0  # fmt: skip
    spec, spec_seed1 = root / "job.yaml", root / "job_seed1.yaml"
    for path, seed in ((spec, 0), (spec_seed1, 1)):
        path.write_text(SPEC.format(data=root / "data" / "dataset.yaml", seed=seed))
    out = root / "run"
    killed = app(spec, out, "all", MEC_FAULT_KILL_AFTER_STEPS="compress:2")
    work = out / "compress"
    finished = sorted(p.stem for p in work.glob("t_*.json"))
    stages_done = sorted(p.parent.name for p in out.glob("*/result.json"))
    damaged = work / f"{finished[-1]}.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0xFF  # tensor data: the file still parses, only its checksum tells
    damaged.write_bytes(bytes(data))
    kept = work / f"{finished[0]}.safetensors"
    kept_state = (kept.stat().st_mtime_ns, kept.read_bytes())
    resumed = app(spec, out, "compress", "--resume")
    kept_after = (kept.stat().st_mtime_ns, kept.read_bytes())
    changed = app(spec_seed1, out, "compress", "--resume")
    return {
        "out": out, "spec": spec_seed1, "killed": killed, "finished": finished,
        "stages_done": stages_done,
        "kept_same": kept_after == kept_state, "resumed": resumed, "changed": changed,
    }  # fmt: skip


def test_compress_killed_mid_table_set_leaves_only_finished_tables(compress_runs: dict) -> None:
    killed = compress_runs["killed"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "kills itself after 2 steps of compress" in killed.stderr
    assert len(compress_runs["finished"]) == 2
    assert compress_runs["stages_done"] == ["pretrain"]


def test_compress_rerun_skips_tables_whose_checksums_match_and_redoes_the_rest(
    compress_runs: dict,
) -> None:
    resumed = compress_runs["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    kept, damaged = compress_runs["finished"]
    did = compress_log(resumed.stderr)
    assert len(did) == 3, did
    assert did.pop(kept) == "skipped" and compress_runs["kept_same"]
    assert did.pop(damaged) == f"{damaged}.safetensors does not match its recorded sha256"
    assert set(did.values()) == {"not done"}
    result = json.loads((compress_runs["out"] / "compress" / "result.json").read_text())
    assert len(result["tables"]) == 3


def test_compress_rerun_redoes_every_table_when_quantizer_settings_change(
    compress_runs: dict,
) -> None:
    changed = compress_runs["changed"]
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "[compress] its inputs changed since" in changed.stderr  # not skipped as a stage
    did = compress_log(changed.stderr)
    assert len(did) == 3 and set(did.values()) == {
        "its inputs changed (pretrained weights, id counts or quantizer settings)"
    }, did


def test_the_startup_space_check_asks_for_no_more_than_the_stages_write(
    compress_runs: dict,
) -> None:
    from apps.dlrm.main import output_bytes
    from apps.dlrm.spec import load_job_spec
    from mec_torchrec.data import ProcessedDataset

    out = compress_runs["out"]
    spec, ds = load_job_spec(compress_runs["spec"]), ProcessedDataset(out / "data")

    def size(folder: Path, pattern: str = "*") -> int:
        return sum(p.stat().st_size for p in folder.glob(pattern))

    pretrain = out / "pretrain"
    # At its peak stage 1 holds best, last, last.prev and the next last being written.
    peak = size(pretrain / "best") + 3 * size(pretrain / "last")
    assert 0.5 * peak <= output_bytes(spec, ds, ["pretrain"]) <= peak
    tables = size(out / "compress", "t_*.safetensors")
    assert 0.5 * tables <= output_bytes(spec, ds, ["compress"]) <= tables


def compress_again_with(
    compress_runs: dict, tmp_path: Path, setting: str
) -> tuple[Path, subprocess.CompletedProcess]:
    """A copy of the fixture's finished job, its compress stage resumed with ``setting`` (one
    YAML line) added to the compression section: (output folder, completed process)."""
    out = tmp_path / "run"
    shutil.copytree(compress_runs["out"], out)
    spec = with_compression_setting(compress_runs, tmp_path, setting)
    return out, app(spec, out, "compress", "--resume")


def assert_every_table_redone(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stderr[-3000:]
    assert set(compress_log(run.stderr).values()) == {
        "its inputs changed (pretrained weights, id counts or quantizer settings)"
    }


def with_compression_setting(compress_runs: dict, tmp_path: Path, setting: str) -> Path:
    spec = tmp_path / "edited.yaml"
    text = compress_runs["spec"].read_text()
    spec.write_text(text.replace("  min_rows: 1300", f"  {setting}\n  min_rows: 1300"))
    return spec


def test_compress_with_exact_rows_redoes_every_table_and_keeps_the_head_rows_exact(
    compress_runs: dict, tmp_path: Path
) -> None:
    from apps.dlrm import checkpoint
    from apps.dlrm.main import table_key
    from mec_torchrec.data import ProcessedDataset
    from mec_torchrec.quantize import CompressedTable, head_rows

    out, run = compress_again_with(compress_runs, tmp_path, "exact_rows: 5")
    assert_every_table_redone(run)
    ds = ProcessedDataset(out / "data")
    for path in sorted((out / "compress").glob("t_*.safetensors")):
        table = CompressedTable.load(path)
        weight = torch.empty(table.num_rows, table.dim)
        checkpoint.load_local(out / "pretrain" / "best", {"model": {table_key(path.stem): weight}})
        head = head_rows(ds.counts(path.stem.removeprefix("t_")), 5)
        assert torch.equal(table.decode(head), weight[head]), path.stem
        assert table.stats["exact_rows"] == 5


def test_a_table_of_its_own_l_is_the_only_one_compress_redoes(
    compress_runs: dict, tmp_path: Path
) -> None:
    from mec_torchrec.quantize import CompressedTable

    names = sorted(p.stem for p in (compress_runs["out"] / "compress").glob("t_*.safetensors"))
    out, run = compress_again_with(
        compress_runs, tmp_path, f"num_subspaces_per_table: {{{names[0]}: 8}}"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    did = compress_log(run.stderr)
    assert did.pop(names[0]).startswith("its inputs changed")
    assert set(did.values()) == {"skipped"}, did
    work = out / "compress"
    assert [CompressedTable.load(work / f"{n}.safetensors").num_subspaces for n in names] == [
        8, *[4] * (len(names) - 1)
    ]


def test_a_per_table_setting_for_a_table_not_compressed_is_refused_at_startup(
    compress_runs: dict, tmp_path: Path
) -> None:
    spec = with_compression_setting(compress_runs, tmp_path, "num_subspaces_per_table: {t_nope: 8}")
    run = app(spec, tmp_path / "run", "all")
    assert run.returncode == 2
    assert "compression.num_subspaces_per_table: ['t_nope'] are not compressed tables" in run.stderr
    assert not (tmp_path / "run" / "pretrain").exists()


def torchx(spec: Path, out: Path, logs: Path, *flags: str, **extra: str) -> subprocess.Popen:
    cmd = [str(BIN / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={logs}",
           "apps/components.py:dlrm_mec", "--spec", str(spec), "--out", str(out), "--stage",
           "train", "-j", "1x2", *flags]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip


def finish(job: subprocess.Popen, timeout: float) -> str:
    try:
        output, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # the torchx process group: agent and ranks
        output, _ = job.communicate()
        pytest.fail(f"torchx job still running after {timeout} s:\n{output[-5000:]}")
    assert job.returncode == 0, output[-5000:]
    return output


def test_torchx_job_with_a_rank_killed_in_stage_3_restarts_and_matches_an_uninterrupted_run(
    compress_runs: dict, tmp_path: Path
) -> None:
    spec = compress_runs["spec"]
    runs = {}
    for name in ("uninterrupted", "killed"):
        runs[name] = tmp_path / name
        shutil.copytree(compress_runs["out"], runs[name])
    # Both jobs at once: they are independent, and the restart spends seconds waiting.
    reference = torchx(spec, runs["uninterrupted"], tmp_path / "logs_ref")
    killed = torchx(spec, runs["killed"], tmp_path / "logs_kill", "--max_retries", "1",
                    "--env", "MEC_FAULT_KILL_AFTER_STEPS=train_warm:7:1")  # fmt: skip
    finish(reference, 400)
    log = finish(killed, 400)

    assert "rank 1 kills itself after 7 steps of train_warm" in log
    assert "restart 1 by torchrun's agent: resuming" in log
    assert f"[train_warm] resumed at epoch 0 step 5 from {runs['killed']}/train_warm/last" in log
    ref, got = (
        json.loads((runs[n] / "train" / "result.json").read_text())["variants"]["warm"]
        for n in ("uninterrupted", "killed")
    )
    # Tolerance: none. Same seed, same data order from the checkpointed step, same kernels.
    steps = [h["step"] for h in got["history"]]
    assert steps == [0, 5, 10, 15, 18]
    for key in ("auc", "logloss", "ne"):
        assert [h[key] for h in got["history"]] == [h[key] for h in ref["history"]], key
        assert got["test"][key] == ref["test"][key], key
    assert got["best_step"] == ref["best_step"]
    for split in ("valid", "test"):  # the untrained model, evaluated by the first attempt
        assert got["start"][split]["auc"] == ref["start"][split]["auc"]


def loss_error(table: Any, weight: torch.Tensor, fisher: torch.Tensor) -> float:
    """sum over rows of (x_hat - x)^T F (x_hat - x): the error a loss-metric fit minimises."""
    err = (table.decode() - weight).double()
    return float(torch.einsum("ni,ij,nj->", err, fisher, err))


def test_compress_in_the_loss_metric_lowers_its_error_and_reuses_its_fisher_on_resume(
    compress_runs: dict, tmp_path: Path
) -> None:
    from safetensors import safe_open

    from apps.dlrm import checkpoint
    from apps.dlrm.main import table_key
    from mec_torchrec.quantize import CompressedTable

    out, run = compress_again_with(compress_runs, tmp_path, "fisher_samples: 600")
    assert_every_table_redone(run)
    # 600 samples on one rank: 3 batches of 256.
    assert "[compress] loss metric: Fisher of 3 tables from 768 samples" in run.stderr
    plain_dir, work = compress_runs["out"] / "compress", out / "compress"
    names = sorted(p.stem for p in work.glob("t_*.safetensors"))
    with safe_open(work / "fisher.safetensors", "pt") as f:
        assert f.metadata()["samples"] == "768" and sorted(f.keys()) == names
        fisher = {name: f.get_tensor(name) for name in names}
    gained = []
    for name in names:
        matrix = fisher[name]
        assert matrix.shape == (16, 16) and torch.allclose(matrix, matrix.T)
        assert float(torch.linalg.eigvalsh(matrix).min()) > -1e-12
        rows = CompressedTable.load(work / f"{name}.safetensors").num_rows
        weight = torch.empty(rows, 16)
        checkpoint.load_local(out / "pretrain" / "best", {"model": {table_key(name): weight}})
        plain, metric = (CompressedTable.load(d / f"{name}.safetensors") for d in (plain_dir, work))
        gained.append(loss_error(plain, weight, matrix) - loss_error(metric, weight, matrix))
    assert sum(gained) > 0, gained
    # As if killed after the first table: resumed, the Fisher file and that table are reused.
    (work / "result.json").unlink()
    for name in names[1:]:
        (work / f"{name}.json").unlink()
    spec = with_compression_setting(compress_runs, tmp_path, "fisher_samples: 600")
    again = app(spec, out, "compress", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[compress] loss metric: reusing" in again.stderr
    assert compress_log(again.stderr) == {
        names[0]: "skipped", **{name: "not done" for name in names[1:]}
    }
    # Another ridge: the same Fisher, every table made again with it.
    ridge = with_compression_setting(compress_runs, tmp_path, "fisher_samples: 600\n  fisher_ridge: 0.5")
    third = app(ridge, out, "compress", "--resume")
    assert_every_table_redone(third)
    assert "[compress] loss metric: reusing" in third.stderr
