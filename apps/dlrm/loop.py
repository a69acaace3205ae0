"""The training loop shared by stage 1 (full tables) and stage 3 (MEC tables).

Train with ``TrainPipelineSparseDist``; every ``eval_every`` of an epoch evaluate on valid with
``torchrec.metrics`` (AUC, NE, logloss), keep the best state on disk, write a resumable ``last``
checkpoint, and stop early after ``patience`` evaluations without improvement. At the end the
best state is loaded back and evaluated on test.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric
from torchrec.optim.keyed import CombinedOptimizer
from tqdm import tqdm

from apps.dlrm import checkpoint, faults
from apps.dlrm.model import Env
from apps.dlrm.spec import TrainingSpec

TASK = RecTaskInfo(name="ctr")


def evaluate(
    pipeline: TrainPipelineSparseDist, batches: Iterator[Batch], env: Env, max_rows: int
) -> dict[str, float]:
    """AUC, NE and logloss over ``batches`` on all ranks (every rank gets the same figures).

    ``max_rows`` bounds the rows one rank sees (it sizes the AUC window so nothing is dropped).
    """
    model = pipeline._model
    was_training = model.training
    model.eval()
    pipeline.reset()
    window = max(max_rows, 1) * env.world_size
    kw: dict[str, Any] = {
        "world_size": env.world_size,
        "my_rank": env.rank,
        "batch_size": 1,
        "tasks": [TASK],
        "window_size": window,
        "compute_on_all_ranks": True,
    }
    auc, ne = AUCMetric(**kw), NEMetric(**kw)
    # Logloss in nats (torchrec's NE module reports it in bits): sum and count, reduced below.
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)
    with torch.no_grad():
        while True:
            try:
                _, logits, labels = pipeline.progress(batches)
            except StopIteration:
                break
            logits, labels = logits.float(), labels.float()
            preds = {TASK.name: torch.sigmoid(logits)}
            labels_ = {TASK.name: labels}
            weights = {TASK.name: torch.ones_like(labels)}
            for metric in (auc, ne):
                metric.update(predictions=preds, labels=labels_, weights=weights)
            bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
            totals[0] += bce.double()
            totals[1] += labels.numel()
    pipeline.reset()
    model.train(was_training)
    torch.distributed.all_reduce(totals)
    a, n = auc.compute(), ne.compute()
    return {
        "auc": float(a[f"auc-{TASK.name}|window_auc"]),
        "ne": float(n[f"ne-{TASK.name}|lifetime_ne"]),
        "logloss": float(totals[0] / totals[1]),
        "rows": int(totals[1]),
    }


@dataclass
class Progress:
    """Loop counters; saved as JSON in every ``last`` checkpoint so a run can resume."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_auc: float = -1.0
    best_step: int = -1
    evals_since_best: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    # Valid and test figures of the state the stage started from (with eval_at_start).
    start: dict[str, dict[str, float]] | None = None


@dataclass
class StageData:
    """How the loop reads the data: ``batches(split, batch_size, shuffle, seed)`` for this rank."""

    batches: Callable[..., Iterator[Batch]]
    train_rows: int
    valid_rows: int
    test_rows: int


def _state(dmp: DistributedModelParallel, optimizer: CombinedOptimizer | None) -> dict[str, Any]:
    state: dict[str, Any] = {"model": dmp.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    return state


def train_stage(
    name: str,
    dmp: DistributedModelParallel,
    optimizer: CombinedOptimizer,
    data: StageData,
    spec: TrainingSpec,
    env: Env,
    work: Path,
    resume: bool,
    eval_at_start: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run one training stage; returns ``{"valid": best, "test": ..., "history": [...], ...}``.

    ``work/last`` (model + optimizer + progress) is rewritten after every evaluation (the one
    before kept as ``work/last.prev``) and ``work/best`` (model) whenever valid AUC improves.
    With ``eval_at_start`` the untrained state is evaluated first (valid and test, returned as
    ``start``) and competes for best (stage 3: MEC with no retraining).
    """
    pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device, execute_all_batches=True)
    steps_per_epoch = max(1, data.train_rows // (spec.batch_size * env.world_size))
    if spec.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, spec.max_steps_per_epoch)
    eval_interval = max(1, math.ceil(spec.eval_every * steps_per_epoch))
    last, best = work / "last", work / "best"

    def run_eval(split: str, limit: int | None) -> dict[str, float]:
        batches = data.batches(split, spec.eval_batch_size, shuffle=False, seed=0)
        if limit is not None:
            batches = itertools.islice(batches, limit)
            bound = limit * spec.eval_batch_size
        else:
            rows = data.valid_rows if split == "valid" else data.test_rows
            bound = math.ceil(rows / env.world_size) + spec.eval_batch_size
        start = time.perf_counter()
        return {**evaluate(pipeline, batches, env, bound), "seconds": time.perf_counter() - start}

    def record(metrics: dict[str, float], p: Progress) -> None:
        p.eval_seconds += metrics["seconds"]
        point = {"step": p.global_step, "epoch": p.global_step / steps_per_epoch, **metrics}
        p.history.append(point)
        improved = metrics["auc"] > p.best_auc
        if improved:
            p.best_auc, p.best_step, p.evals_since_best = metrics["auc"], p.global_step, 0
            start = time.perf_counter()
            checkpoint.save(best, {"model": dmp.state_dict()})
            p.checkpoint_seconds += time.perf_counter() - start
        else:
            p.evals_since_best += 1
        log(
            f"[{name}] step {p.global_step} ({point['epoch']:.2f} ep) valid auc "
            f"{metrics['auc']:.5f} logloss {metrics['logloss']:.5f}"
            f"{' *best*' if improved else ''}"
        )

    p = Progress()
    # The newest intact `last` (or `last.prev` when `last` is corrupted): see checkpoint.latest.
    found = checkpoint.latest(last, lambda msg: log(f"[{name}] {msg}")) if resume else None
    if found is not None:
        if hasattr(optimizer, "init_state"):
            optimizer.init_state()  # materialise the dense optimizer state the checkpoint fills
        state = _state(dmp, optimizer)
        p = Progress(**checkpoint.load(found, state))
        dmp.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])
        log(f"[{name}] resumed at epoch {p.epoch} step {p.step_in_epoch} from {found}")
    elif eval_at_start:
        record(run_eval("valid", spec.max_eval_batches), p)
        p.start = {"valid": p.history[-1], "test": run_eval("test", None)}
        log(f"[{name}] before training: test auc {p.start['test']['auc']:.5f}")

    samples_per_step = spec.batch_size * env.world_size
    dmp.train()
    while p.epoch < spec.epochs and not p.stopped_early:
        train = data.batches("train", spec.batch_size, shuffle=True, seed=spec.seed + p.epoch)
        train = itertools.islice(train, p.step_in_epoch, steps_per_epoch)
        bar = tqdm(
            total=(steps_per_epoch - p.step_in_epoch) * samples_per_step,
            unit="sample",
            unit_scale=True,
            desc=f"{name} epoch {p.epoch}",
            disable=not env.is_main,
            mininterval=2.0,
            leave=False,
        )
        while True:
            want = min(
                eval_interval - p.step_in_epoch % eval_interval, steps_per_epoch - p.step_in_epoch
            )
            start, steps = time.perf_counter(), 0
            pipeline.reset()
            segment = itertools.islice(train, want)
            while True:
                try:
                    pipeline.progress(segment)
                except StopIteration:
                    break
                steps += 1
                bar.update(samples_per_step)
                faults.kill_point(name, p.global_step + steps, env.rank)
            p.train_seconds += time.perf_counter() - start
            p.step_in_epoch += steps
            p.global_step += steps
            # A split shorter than the estimate ends the epoch early.
            epoch_done = steps < want or p.step_in_epoch >= steps_per_epoch
            if steps:
                record(run_eval("valid", spec.max_eval_batches), p)
                if spec.patience and p.evals_since_best >= spec.patience:
                    p.stopped_early = True
            if epoch_done:
                p.epoch, p.step_in_epoch = p.epoch + 1, 0
            start = time.perf_counter()
            checkpoint.save(last, _state(dmp, optimizer), progress=vars(p), keep_previous=True)
            p.checkpoint_seconds += time.perf_counter() - start
            if epoch_done or p.stopped_early:
                break
        bar.close()
        if p.stopped_early:
            log(f"[{name}] early stop: no better valid AUC in {spec.patience} evaluations")

    state = {"model": dmp.state_dict()}
    checkpoint.load(best, state)
    dmp.load_state_dict(state["model"])
    test = run_eval("test", None)
    valid = max(p.history, key=lambda h: h["auc"])
    log(
        f"[{name}] best step {p.best_step}: test auc {test['auc']:.5f} logloss {test['logloss']:.5f}"
    )
    return {
        "valid": valid,
        "test": test,
        "best_step": p.best_step,
        "steps_per_epoch": steps_per_epoch,
        "history": p.history,
        "start": p.start,
        "train_seconds": p.train_seconds,
        "eval_seconds": p.eval_seconds,
        "checkpoint_seconds": p.checkpoint_seconds,
        "samples_per_second": p.global_step * samples_per_step / max(p.train_seconds, 1e-9),
    }
