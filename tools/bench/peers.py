"""MEC against what else a TorchRec user could do, at the same memory, on the same DLRM and data.

    .venv/bin/python tools/bench/peers.py [--spec specs/synthetic.yaml] [--out DIR]
                                          [--seeds 0 1 2] [--quick]

One single-process DLRM (torchrec's, via ``apps.dlrm.model.build_dlrm``), one dataset and split,
once per embedding option; every option is reported with test AUC, logloss, embedding bytes as
stored, ratio vs fp32 and the embedding lookup's CPU time:

- fp32 full tables, trained from scratch once per seed (the upper bound; its best-valid state is
  the pretrained model every post-training row below starts from);
- fp16 / int8 / int4 / int2: TorchRec's ``quantize_inference_model`` of that fp32 model (FBGEMM
  row-wise tables, bytes as the kernel stores them);
- hashing trick and quotient-remainder tables sized to full MEC's bytes, trained from scratch
  like fp32, on as many rows as MEC's pretraining + retraining;
- plain PQ (k-means) at MEC's L, K; MEC without PWR, without the contrastive term, full MEC: each
  quantized from the pretrained tables with train-split counts, evaluated as is ("no retrain")
  and after retraining codebooks + dense layers (warm start) with best-valid-state selection;
- MEC as the demo's stage 2 makes it: count sampling + count-weighted refit (``mec-count``),
  + the 64 most frequent ids exact (``mec-exact``), + each table fitted in the loss's Fisher
  metric over 163,840 train rows (``mec-fisher``);
- full MEC at L in {2, 4, 8} x K in {256, 1024} for the AUC-vs-bytes curve;
- a control: the fp32 model through the same retraining stage (MEC's stage 3 is extra training).

Every row at MEC's main budget (L4 K256) runs once per ``--seeds`` entry, so differences are
paired by seed; the rest of the curve runs with the first seed only.

Writes ``DIR/peers.md`` (table), ``DIR/peers.png`` (test AUC vs bytes, log x) and
``DIR/results.json`` (every figure; a rerun with the same DIR reuses finished rows and the saved
pretrained models). Training uses one torch thread: on a shared 2-core host more threads slowed
every step down ~5x.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from peers_report import MAIN, goals, markdown, plot, summarize  # beside this script
from torchrec import EmbeddingBagCollection

from apps.dlrm.model import build_dlrm, collect_fisher, table_configs
from apps.dlrm.spec import JobSpec, ModelSpec, load_job_spec
from mec_torchrec.baselines import (
    HashedEmbeddingBagCollection,
    QREmbeddingBagCollection,
    hash_buckets,
    qr_remainder,
    quantize_ebc,
    stored_bytes,
)
from mec_torchrec.data import ProcessedDataset, load_dataset_spec, prepare_dataset, synthesize
from mec_torchrec.modules import MECEmbeddingBagCollection
from mec_torchrec.quantize import (
    CompressedTable,
    MECQuantizer,
    PQQuantizer,
    code_dtype,
    fit_table,
)

EXACT_ROWS = 64  # as specs/synthetic.yaml's compression.exact_rows


@dataclass(frozen=True)
class Setup:
    """Sizes of one benchmark run (``--quick`` shrinks them)."""

    dim: int = 64
    batch_size: int = 4096
    eval_batch_size: int = 16384
    train_rows: int = 800_000  # rows of pretraining (one epoch of the built-in data)
    retrain_rows: int = 200_000  # rows of the retraining stage
    evals_per_epoch: int = 4  # valid evaluations over pretraining
    retrain_evals: int = 8  # valid evaluations over retraining
    patience: int = 3
    valid_rows: int = 32768
    quantizer_epochs: int = 2
    quantizer_sample: int = 20_000
    kmeans_init: int = 8192
    fisher_rows: int = 163_840  # as specs/synthetic.yaml's compression.fisher_samples
    curve: tuple[tuple[int, int], ...] = (
        (2, 256), (4, 256), (8, 256), (2, 1024), (4, 1024), (8, 1024))


QUICK = Setup(train_rows=120_000, retrain_rows=40_000, evals_per_epoch=2, retrain_evals=2,
              valid_rows=16384, quantizer_epochs=1, quantizer_sample=8192, kmeans_init=2048,
              fisher_rows=16384,
              curve=((4, 256), (8, 256)))


# -- data and model ---------------------------------------------------------------------------


def open_data(spec: JobSpec, out: Path) -> ProcessedDataset:
    """Prepare the job's dataset; the built-in data is generated first when missing."""
    dspec = load_dataset_spec(spec.data)
    train_dir = Path(dspec.train[0]).parent
    if dspec.name == "synthetic" and not any(train_dir.glob("*.parquet")):
        print(f"generating the built-in data in {train_dir.parent}", flush=True)
        synthesize(train_dir.parent, progress=False)
    return prepare_dataset(dspec, Path(spec.data_dir) if spec.data_dir else out / "data")


def model_spec(dim: int) -> ModelSpec:
    # Smaller MLPs than the app's demo: this benchmark trains ~20 models on 2 shared cores.
    return ModelSpec(arch="dlrm", embedding_dim=dim, dense_arch_layer_sizes=[64, dim],
                     over_arch_layer_sizes=[64, 1])


def new_model(ds: ProcessedDataset, ebc: nn.Module, dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_dlrm(ebc, model_spec(dim), len(ds.dense_names))


def embeddings(model: nn.Module) -> nn.Module:
    return model.model.sparse_arch.embedding_bag_collection


def with_embeddings(model: nn.Module, module: nn.Module) -> nn.Module:
    """A copy of ``model`` (dense layers included) serving ``module`` as its tables."""
    out = copy.deepcopy(model)
    out.model.sparse_arch.embedding_bag_collection = module
    return out


# -- training and evaluation ------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, ds: ProcessedDataset, split: str, s: Setup, rows: int | None = None):
    """AUC and logloss (nats) on the first ``rows`` rows of ``split`` (all when None)."""
    from torchmetrics.functional.classification import binary_auroc

    model.eval()
    logits, labels = [], []
    batches = ds.batches(split, s.eval_batch_size)
    if rows is not None:
        batches = itertools.islice(batches, max(1, rows // s.eval_batch_size))
    for batch in batches:
        _, (_, logit, label) = model(batch)
        logits.append(logit.float())
        labels.append(label.float())
    model.train()
    logit, label = torch.cat(logits), torch.cat(labels)
    return {"auc": float(binary_auroc(torch.sigmoid(logit), label.long())),
            "logloss": float(F.binary_cross_entropy_with_logits(logit, label))}


def train(model: nn.Module, groups: list[tuple[list[nn.Parameter], str, float]],
          ds: ProcessedDataset, s: Setup, seed: int, rows: int, evals: int,
          eval_at_start: bool) -> dict[str, Any]:
    """Train on ``rows`` train rows, evaluate on valid ``evals`` times, keep the best state.

    ``groups``: (params, "adagrad" | "adam", lr). With ``eval_at_start`` the untrained state
    competes for best (a retrained model is never worse on valid than no retraining).
    """
    opts = [(torch.optim.Adagrad if kind == "adagrad" else torch.optim.Adam)(params, lr=lr)
            for params, kind, lr in groups if params]
    steps = max(1, rows // s.batch_size)
    every = max(1, steps // evals)
    history, best, best_state, stale = [], -1.0, None, 0

    def check(step: int) -> bool:
        nonlocal best, best_state, stale
        m = evaluate(model, ds, "valid", s, s.valid_rows)
        history.append({"step": step, **m})
        if m["auc"] > best:
            best, best_state, stale = m["auc"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
        return stale >= s.patience

    if eval_at_start:
        check(0)
    start, step, epoch = time.perf_counter(), 0, 0
    model.train()
    while step < steps:
        batches = ds.batches("train", s.batch_size, shuffle=True, seed=1000 * seed + epoch,
                             drop_last=True)
        for batch in itertools.islice(batches, steps - step):
            loss, _ = model(batch)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in opts:
                opt.step()
            step += 1
            if (step % every == 0 or step == steps) and check(step):
                steps = step  # early stop: no better valid AUC in `patience` evaluations
                break
        epoch += 1
    model.load_state_dict(best_state)
    best_step = max(history, key=lambda h: h["auc"])["step"]
    return {"history": history, "best_step": best_step, "steps": step,
            "train_seconds": time.perf_counter() - start}


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(embedding-module parameters, every other parameter)."""
    emb = list(embeddings(model).parameters())
    ids = {id(p) for p in emb}
    return emb, [p for p in model.parameters() if id(p) not in ids]


def train_from_scratch(model: nn.Module, ds: ProcessedDataset, spec: JobSpec, s: Setup,
                       seed: int, rows: int) -> dict[str, Any]:
    """Stage 1 for fp32, hashing and QR: Adagrad on tables, Adam on dense layers."""
    emb, dense = split_params(model)
    t = spec.training
    groups = [(emb, "adagrad", t.embedding_lr), (dense, "adam", t.dense_lr)]
    evals = max(1, round(s.evals_per_epoch * rows / s.train_rows))
    return train(model, groups, ds, s, seed, rows, evals, False)


def retrain(model: nn.Module, ds: ProcessedDataset, spec: JobSpec, s: Setup,
            seed: int) -> dict[str, Any]:
    """Stage 3 (warm): codebooks and small tables with Adagrad, dense layers with Adam."""
    emb, dense = split_params(model)
    r = spec.retrain
    groups = [(emb, "adagrad", r.codebook_lr), (dense, "adam", r.dense_lr)]
    return train(model, groups, ds, s, seed + 7, s.retrain_rows, s.retrain_evals, True)


# -- measuring one option ---------------------------------------------------------------------


def module_bytes(module: nn.Module) -> int:
    """Embedding bytes as stored: FBGEMM rows for quantized EBCs, codes + codebooks for MEC."""
    if hasattr(module, "embedding_bytes"):
        return sum(b.stored for b in module.embedding_bytes().values())
    if isinstance(module, EmbeddingBagCollection):
        return sum(p.numel() * p.element_size() for p in module.parameters())
    return stored_bytes(module)


@torch.no_grad()
def lookup_ms(module: nn.Module, ds: ProcessedDataset, rounds: int = 20) -> float:
    """CPU time of one embedding lookup of a 4096-row test batch (best of ``rounds``)."""
    kjt = next(iter(ds.batches("test", 4096))).sparse_features
    module(kjt)
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        module(kjt)
        best = min(best, time.thread_time() - start)
    return best * 1e3


def measure(model: nn.Module, ds: ProcessedDataset, s: Setup, **extra: Any) -> dict[str, Any]:
    module = embeddings(model)
    return {**evaluate(model, ds, "test", s), "bytes": module_bytes(module),
            "lookup_ms": lookup_ms(module, ds), **extra}


def measure_ptq(fp32: nn.Module, dtype: str, ds: ProcessedDataset, s: Setup) -> dict[str, Any]:
    return measure(with_embeddings(fp32, quantize_ebc(embeddings(fp32), dtype)), ds, s)


def measure_retrained(model: nn.Module, ds: ProcessedDataset, spec: JobSpec, s: Setup,
                      seed: int) -> dict[str, Any]:
    info = retrain(model, ds, spec, s, seed)
    return measure(model, ds, s, **info)


def measure_fp32_retrained(fp32: nn.Module, ds: ProcessedDataset, spec: JobSpec, s: Setup,
                           seed: int) -> dict[str, Any]:
    """Control: the fp32 model through the same retraining stage MEC gets (extra training)."""
    model = copy.deepcopy(fp32)
    for bag in embeddings(model).embedding_bags.values():
        bag.sparse = True
    info = retrain(model, ds, spec, s, seed)
    for bag in embeddings(model).embedding_bags.values():
        bag.sparse = False
    return measure(model, ds, s, **info)


def compressed_bytes(rows: int, dim: int, L: int, K: int) -> int:
    """Codes + fp32 codebooks of one table (``CompressedTable.nbytes`` without building it)."""
    return rows * L * torch.empty(0, dtype=code_dtype(K)).element_size() + K * dim * 4


def worth_compressing(rows: int, dim: int, L: int, K: int) -> bool:
    """A table is compressed when codes + codebooks take fewer bytes than the fp32 table."""
    return rows >= K and compressed_bytes(rows, dim, L, K) < rows * dim * 4


def loss_fisher(model: nn.Module, ds: ProcessedDataset, s: Setup, seed: int) -> dict:
    """Per feature, the empirical Fisher of ``model``'s loss w.r.t. its pooled embedding over
    ``s.fisher_rows`` shuffled train rows (what the app's compression.fisher_samples does)."""
    batches = ds.batches("train", s.batch_size, shuffle=True, seed=seed)
    num_batches = -(-s.fisher_rows // s.batch_size)
    return collect_fisher(model, batches, num_batches, torch.device("cpu")).fisher()


def compress(ebc: EmbeddingBagCollection, ds: ProcessedDataset, s: Setup, method: str,
             L: int, K: int, seed: int,
             fisher: Callable[[], dict] | None = None) -> tuple[dict[str, CompressedTable], float]:
    """Quantize the tables worth it with train-split counts; (tables, seconds).

    ``mec-exact`` adds the demo's 64 exact head rows to ``mec-count``; ``mec-fisher`` (the demo's
    stage 2) also fits each table in the loss metric ``fisher()`` gives (its time counted).
    """
    start, out = time.perf_counter(), {}
    matrices = fisher() if method == "mec-fisher" and fisher is not None else {}
    for config in ebc.embedding_bag_configs():
        if not worth_compressing(config.num_embeddings, config.embedding_dim, L, K):
            continue
        weight = ebc.embedding_bags[config.name].weight.detach()
        counts = ds.counts(config.feature_names[0])
        if method == "pq":
            q: Any = PQQuantizer(L, K, sample_size=s.quantizer_sample, init_size=s.kmeans_init,
                                 seed=seed)
        elif method in ("mec-count", "mec-exact", "mec-fisher"):  # rows drawn, refitted by counts
            q = MECQuantizer(L, K, epochs=s.quantizer_epochs, sample_size=s.quantizer_sample,
                             init_size=s.kmeans_init, batch_size=4096, seed=seed,
                             use_pwr=False, no_pwr_sampling="count", polish_iters=3,
                             final_weighting="sampling")
        else:
            q = MECQuantizer(L, K, epochs=s.quantizer_epochs, sample_size=s.quantizer_sample,
                             init_size=s.kmeans_init, batch_size=4096, seed=seed,
                             use_pwr=method != "mec-no-pwr",
                             use_contrastive=method != "mec-no-contrastive")
        exact = min(EXACT_ROWS, len(counts)) if method in ("mec-exact", "mec-fisher") else 0
        out[config.name] = fit_table(q, weight, counts, exact_rows=exact,
                                     fisher=matrices.get(config.feature_names[0]))
    return out, time.perf_counter() - start


# -- the run ----------------------------------------------------------------------------------


class Results:
    """``results.json`` in the output folder: rows computed once, reused by a rerun."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if key not in self.rows:
            start = time.perf_counter()
            self.rows[key] = {**compute(), "seconds": time.perf_counter() - start}
            self.path.write_text(json.dumps(self.rows, indent=1))
            r = self.rows[key]
            print(f"{time.strftime('%H:%M:%S')} {key}: auc {r['auc']:.5f} logloss "
                  f"{r['logloss']:.5f} bytes {r['bytes']:,} ({r['seconds']:.0f}s)", flush=True)
        return self.rows[key]


def pretrained(ds: ProcessedDataset, spec: JobSpec, s: Setup, seed: int, out: Path,
               results: Results) -> nn.Module:
    """The fp32 model of ``seed`` (trained once, saved, reloaded by later rows and reruns)."""
    path = out / f"fp32_seed{seed}.pt"
    tables = table_configs(ds.feature_names, ds.num_embeddings, s.dim)
    torch.manual_seed(seed)
    model = new_model(ds, EmbeddingBagCollection(tables=tables), s.dim, seed)
    if path.exists() and f"fp32/s{seed}" in results.rows:
        model.load_state_dict(torch.load(path))
        return model

    def run() -> dict[str, Any]:
        for bag in embeddings(model).embedding_bags.values():
            bag.sparse = True  # sparse row gradients: Adagrad touches only the rows looked up
        info = train_from_scratch(model, ds, spec, s, seed, s.train_rows)
        for bag in embeddings(model).embedding_bags.values():
            bag.sparse = False
        torch.save(model.state_dict(), path)
        return measure(model, ds, s, **info)

    results.get(f"fp32/s{seed}", run)
    return model


def run_seed(ds: ProcessedDataset, spec: JobSpec, s: Setup, seed: int, first: bool, out: Path,
             results: Results) -> None:
    """Every row of one seed (the curve beyond L4 K256 only with the first seed)."""
    fp32 = pretrained(ds, spec, s, seed, out, results)
    ebc = embeddings(fp32)
    for dtype in ("fp16", "int8", "int4", "int2"):
        results.get(f"{dtype}/s{seed}", partial(measure_ptq, fp32, dtype, ds, s))

    results.get(f"fp32-retrained/s{seed}", partial(measure_fp32_retrained, fp32, ds, spec, s, seed))

    methods = [("mec", *MAIN), ("pq", *MAIN), ("mec-no-pwr", *MAIN), ("mec-no-contrastive", *MAIN),
               ("mec-count", *MAIN), ("mec-exact", *MAIN), ("mec-fisher", *MAIN)]
    fisher = partial(loss_fisher, fp32, ds, s, seed)
    if first:
        methods += [("mec", L, K) for L, K in s.curve if (L, K) != MAIN]
    for method, L, K in methods:
        name = f"{method}-L{L}-K{K}"
        if f"{name}/s{seed}" in results.rows:
            continue
        tables, seconds = compress(ebc, ds, s, method, L, K, seed, fisher)
        model = with_embeddings(fp32, MECEmbeddingBagCollection.from_ebc(ebc, tables))
        results.get(f"{name}/no-retrain/s{seed}",
                    partial(measure, model, ds, s, compress_seconds=seconds))
        results.get(f"{name}/s{seed}", partial(measure_retrained, model, ds, spec, s, seed))

    # Hashing and QR get full MEC's bytes table by table (codes + codebooks), small tables full.
    tables = ebc.embedding_bag_configs()
    rows = {t.name: t.num_embeddings for t in tables}
    budget = {t.name: compressed_bytes(t.num_embeddings, s.dim, *MAIN) for t in tables
              if worth_compressing(t.num_embeddings, s.dim, *MAIN)}
    makers = {
        "hashing": lambda: HashedEmbeddingBagCollection(
            tables, {n: hash_buckets(b, s.dim) for n, b in budget.items()}, seed=seed),
        "qr": lambda: QREmbeddingBagCollection(
            tables, {n: qr_remainder(rows[n], b, s.dim) for n, b in budget.items()}),
    }
    for name, make in makers.items():
        def run(make=make) -> dict[str, Any]:
            torch.manual_seed(seed)
            model = new_model(ds, make(), s.dim, seed)
            # As many training rows as MEC saw in all (pretraining + retraining).
            seen = s.train_rows + s.retrain_rows
            return measure(model, ds, s, **train_from_scratch(model, ds, spec, s, seed, seen))

        results.get(f"{name}/s{seed}", run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default=str(ROOT / "specs/synthetic.yaml"),
                        help="job spec: its data and learning rates (model sizes are the bench's)")
    parser.add_argument("--out", default=str(ROOT / "out/peers"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    s = QUICK if args.quick else Setup()
    spec = load_job_spec(args.spec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = open_data(spec, out)
    results = Results(out / "results.json")
    start = time.perf_counter()
    for i, seed in enumerate(args.seeds):
        run_seed(ds, spec, s, seed, i == 0, out, results)
    lines = summarize(results.rows)
    table = markdown(lines) + "".join(
        "\n" + goals(results.rows, f"{method}-L{MAIN[0]}-K{MAIN[1]}")
        for method in ("mec", "mec-count", "mec-exact", "mec-fisher"))
    (out / "peers.md").write_text(table)
    plot(results.rows, args.seeds[0], out / "peers.png")
    print(table)
    print(f"{time.perf_counter() - start:.0f}s; wrote {out}/peers.md, peers.png, results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
