"""The built-in data: Criteo-shaped rows whose labels come from a hidden latent-factor model.

Each categorical id has a latent vector drawn around one of a few cluster centres (structure a
product quantizer can exploit). The click logit is a sum of pairwise dot products between the
latents of several fields (exactly what DLRM's interaction layer models), per-id first-order
effects, a dense-feature term and noise; a bias found by bisection sets the positive rate.
Embedding quality therefore decides the AUC: ``SynthSummary`` reports the ceiling (the true
logit), the same logit with each latent replaced by its cluster centre or by another id's latent,
and a logistic regression on the dense features alone.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mec_torchrec.data.baselines import fit_logistic, predict_logistic, roc_auc
from mec_torchrec.data.spec import CRITEO_CATEGORICAL, CRITEO_DENSE
from mec_torchrec.io import atomic_dir, atomic_write_text

# Criteo Kaggle per-feature cardinalities (TorchRec's DLRM Kaggle recipe), C1..C26.
CRITEO_KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
SMALL_FEATURE = 100  # features up to this size keep their real cardinality at any scale
LATENT_DIM = 8
NUM_CLUSTERS = 16
CHUNK_ROWS = 1 << 18  # rows generated per step (the progress-bar unit and one parquet shard)
SPLIT_FRACTIONS = (("train", 0.8), ("valid", 0.1), ("test", 0.1))
# Fields whose latents interact: the big tables (what compression is for) and a few mid-sized ones.
INTERACTING = ("C1", "C3", "C4", "C7", "C10", "C12", "C15", "C16", "C21", "C24", "C26")
# Standard deviations of the logit's parts.
INTERACTION_STD, FIRST_ORDER_STD, DENSE_STD, NOISE_STD = 1.6, 0.5, 0.6, 0.4
POSITIVE_RATE = 0.25


def scaled_cardinalities(scale: float) -> list[int]:
    """Criteo Kaggle's sizes times ``scale``; features of <= 100 values keep their size."""
    return [c if c <= SMALL_FEATURE else max(SMALL_FEATURE, round(c * scale))
            for c in CRITEO_KAGGLE_CARDINALITIES]


@dataclass(frozen=True)
class _Field:
    """One categorical field of the hidden model (ids are popularity ranks before ``perm``)."""

    name: str
    cdf: np.ndarray  # [n] Zipf CDF over popularity ranks
    perm: np.ndarray  # [n] popularity rank -> written id
    first_order: np.ndarray  # [n]
    latent: np.ndarray | None  # [n, LATENT_DIM], for interacting fields
    centre: np.ndarray | None  # [n, LATENT_DIM], each id's cluster centre

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cdf, rng.random(n)), len(self.cdf) - 1)


def _make_field(rng: np.random.Generator, name: str, n: int, interacting: bool) -> _Field:
    exponent = rng.uniform(1.0, 1.3)
    p = 1.0 / np.arange(1, n + 1) ** exponent
    latent = centre = None
    if interacting:
        centres = rng.normal(size=(min(NUM_CLUSTERS, n), LATENT_DIM)) / math.sqrt(LATENT_DIM)
        centre = centres[rng.integers(0, len(centres), n)]
        latent = centre + 0.5 * rng.normal(size=(n, LATENT_DIM)) / math.sqrt(LATENT_DIM)
    return _Field(name, np.cumsum(p) / p.sum(), rng.permutation(n).astype(np.int64),
                  rng.normal(size=n), latent, centre)


@dataclass
class _Chunk:
    ids: dict[str, np.ndarray]  # popularity ranks [n] (single) or [sum lengths] (multi)
    lengths: dict[str, np.ndarray]  # multi-valued features: [n]
    dense: np.ndarray  # [n, 13] raw counts, NaN = missing
    parts: dict[str, np.ndarray]  # unscaled logit parts [n]


class _HiddenModel:
    def __init__(self, seed: int, scale: float, multi_valued: int) -> None:
        rng = np.random.default_rng([seed, 1])
        cards = scaled_cardinalities(scale)
        self.fields = [_make_field(rng, name, n, name in INTERACTING)
                       for name, n in zip(CRITEO_CATEGORICAL, cards)]
        self.multi = [_make_field(rng, f"M{i + 1}", max(SMALL_FEATURE, round(200_000 * scale)),
                                  True) for i in range(multi_valued)]
        self.dense_mu = rng.uniform(0.0, 4.0, len(CRITEO_DENSE))
        self.dense_sigma = rng.uniform(0.5, 2.0, len(CRITEO_DENSE))
        self.dense_missing = rng.uniform(0.0, 0.45, len(CRITEO_DENSE))
        self.dense_weight = rng.normal(size=len(CRITEO_DENSE))
        self.scales: dict[str, float] = {}
        self.bias = 0.0

    def generate(self, rng: np.random.Generator, n: int) -> _Chunk:
        ids = {f.name: f.sample(rng, n) for f in self.fields}
        lengths = {}
        pooled = {}
        for f in self.multi:
            lengths[f.name] = np.minimum(1 + rng.poisson(1.5, n), 8)
            ids[f.name] = f.sample(rng, int(lengths[f.name].sum()))
            row = np.repeat(np.arange(n), lengths[f.name])
            for kind in ("latent", "centre"):
                total = np.zeros((n, LATENT_DIM))
                np.add.at(total, row, getattr(f, kind)[ids[f.name]])
                pooled[f.name, kind] = total / lengths[f.name][:, None]
        log_dense = rng.normal(self.dense_mu, self.dense_sigma, (n, len(CRITEO_DENSE)))
        dense = np.floor(np.expm1(np.abs(log_dense)))
        dense[rng.random(dense.shape) < self.dense_missing] = np.nan
        shuffled = rng.permutation(n)  # "random embeddings": each row gets another row's latents
        parts = {"first_order": sum(f.first_order[ids[f.name]] for f in self.fields),
                 "dense": _standardize(np.log1p(np.nan_to_num(dense))) @ self.dense_weight,
                 "noise": rng.normal(size=n)}
        for kind, rows in (("latent", None), ("centre", None), ("random", shuffled)):
            source = "latent" if kind == "random" else kind
            vectors = [getattr(f, source)[ids[f.name]] for f in self.fields if f.latent is not None]
            vectors += [pooled[f.name, source] for f in self.multi]
            if rows is not None:
                vectors = [v[rows] for v in vectors]
            total = sum(vectors)
            squares = sum((v * v).sum(1) for v in vectors)
            parts[f"interaction_{kind}"] = 0.5 * ((total * total).sum(1) - squares)
        return _Chunk(ids, lengths, dense, parts)

    def calibrate(self, chunk: _Chunk) -> None:
        """Fix each logit part's scale, then the bias that gives ``POSITIVE_RATE`` positives."""
        for name, std in (("interaction", INTERACTION_STD), ("first_order", FIRST_ORDER_STD),
                          ("dense", DENSE_STD), ("noise", NOISE_STD)):
            key = "interaction_latent" if name == "interaction" else name
            self.scales[name] = std / float(chunk.parts[key].std())
        logit = self.logits(chunk)["truth"] + self.scales["noise"] * chunk.parts["noise"]
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if (1.0 / (1.0 + np.exp(-(logit + mid)))).mean() > POSITIVE_RATE:
                hi = mid
            else:
                lo = mid
        self.bias = (lo + hi) / 2

    def logits(self, chunk: _Chunk) -> dict[str, np.ndarray]:
        """Noise-free logits: ``truth`` and its damaged-embedding variants ``centre``/``random``."""
        base = self.bias + self.scales["first_order"] * chunk.parts["first_order"] + \
            self.scales["dense"] * chunk.parts["dense"]
        return {kind: base + self.scales["interaction"] * chunk.parts[f"interaction_{key}"]
                for kind, key in (("truth", "latent"), ("centre", "centre"), ("random", "random"))}


def _standardize(x: np.ndarray) -> np.ndarray:
    return (x - 1.5) / 1.5  # fixed, data-independent: log1p(counts) are O(1)-O(5)


def _table(model: _HiddenModel, chunk: _Chunk, labels: np.ndarray, truth: np.ndarray,
           lo: int, hi: int) -> pa.Table:
    columns: dict[str, pa.Array] = {"label": pa.array(labels[lo:hi].astype(np.int64))}
    for j, name in enumerate(CRITEO_DENSE):
        x = chunk.dense[lo:hi, j]
        columns[name] = pa.array(np.nan_to_num(x).astype(np.int64), mask=np.isnan(x))
    for f in model.fields:
        columns[f.name] = pa.array(f.perm[chunk.ids[f.name][lo:hi]])
    for f in model.multi:
        offsets = np.concatenate([[0], np.cumsum(chunk.lengths[f.name])])
        values = f.perm[chunk.ids[f.name][offsets[lo]:offsets[hi]]]
        columns[f.name] = pa.ListArray.from_arrays(
            pa.array(offsets[lo:hi + 1] - offsets[lo], pa.int32()), pa.array(values))
    columns["truth_logit"] = pa.array(truth[lo:hi].astype(np.float32))
    return pa.table(columns)


@dataclass
class SynthSummary:
    """What ``synthesize`` wrote and how hard the data is (AUCs on the test split)."""

    out: str
    rows: dict[str, int]
    cardinalities: dict[str, int]
    positive_rate: float
    seconds: float
    auc_ceiling: float  # the hidden logit itself (noise-free)
    auc_cluster_centres: float  # every latent replaced by its cluster centre
    auc_random_embeddings: float  # interaction term computed from other rows' latents
    auc_dense_only: float  # logistic regression on log1p(dense), fit on the first chunk


def _spec_yaml(multi_valued: list[str]) -> str:
    lines = ["# Written by `mec data synth`: the built-in Criteo-shaped data (docs/data.md).",
             "name: synthetic", "format: parquet"]
    lines += [f"{split}: {split}/*.parquet" for split, _ in SPLIT_FRACTIONS]
    lines += ["label: label", f"dense: [{', '.join(CRITEO_DENSE)}]",
              f"categorical: [{', '.join(CRITEO_CATEGORICAL)}]"]
    if multi_valued:
        lines.append(f"multi_valued: [{', '.join(multi_valued)}]")
    lines += ["min_count: 1", "dense_transform: log1p"]
    return "\n".join(lines) + "\n"


def synthesize(out: str | Path, *, rows: int = 1_000_000, scale: float = 0.01, seed: int = 0,
               multi_valued: int = 0, progress: bool = True) -> SynthSummary:
    """Write ``rows`` rows as ``out/{train,valid,test}/part-*.parquet`` (80/10/10), the spec
    ``out/dataset.yaml`` and ``out/synth.json``; the same arguments give the same files."""
    if rows < 10:
        raise ValueError(f"--rows must be at least 10, got {rows}")
    if not 0 < scale < float("inf"):  # NaN fails too
        raise ValueError(f"--scale must be positive and finite, got {scale}")
    if multi_valued < 0:
        raise ValueError(f"--multi-valued must be >= 0, got {multi_valued}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "synth.json").is_file():
        raise ValueError(f"{out} exists and is not the output of `mec data synth`; "
                         f"refusing to replace it")
    start = time.perf_counter()
    model = _HiddenModel(seed, scale, multi_valued)
    bounds = np.cumsum([0] + [round(rows * frac) for _, frac in SPLIT_FRACTIONS])
    bounds[-1] = rows
    counts = {split: 0 for split, _ in SPLIT_FRACTIONS}
    test_rows: list[tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]] = []
    positives = 0
    with atomic_dir(out) as tmp, tqdm(total=rows, unit="row", disable=not progress,
                                      desc="mec data synth") as bar:
        for c, chunk_start in enumerate(range(0, rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, rows - chunk_start)
            rng = np.random.default_rng([seed, 2, c])
            chunk = model.generate(rng, n)
            if c == 0:
                model.calibrate(chunk)
                dense_x = np.log1p(np.nan_to_num(chunk.dense))
            logits = model.logits(chunk)
            noisy = logits["truth"] + model.scales["noise"] * chunk.parts["noise"]
            labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-noisy))).astype(np.int64)
            if c == 0:
                dense_model = fit_logistic(dense_x, labels)
            positives += int(labels.sum())
            for s, (split, _) in enumerate(SPLIT_FRACTIONS):
                lo = max(bounds[s], chunk_start) - chunk_start
                hi = min(bounds[s + 1], chunk_start + n) - chunk_start
                if lo >= hi:
                    continue
                (tmp / split).mkdir(exist_ok=True)
                pq.write_table(_table(model, chunk, labels, logits["truth"], lo, hi),
                               tmp / split / f"part-{c:05d}.parquet")
                counts[split] += int(hi - lo)
                if split == "test":
                    test_rows.append((labels[lo:hi], {k: v[lo:hi] for k, v in logits.items()},
                                      np.log1p(np.nan_to_num(chunk.dense[lo:hi]))))
            bar.update(n)
        multi = [f.name for f in model.multi]
        atomic_write_text(tmp / "dataset.yaml", _spec_yaml(multi))
        y = np.concatenate([t[0] for t in test_rows])
        test_logits = {k: np.concatenate([t[1][k] for t in test_rows]) for k in test_rows[0][1]}
        x = np.concatenate([t[2] for t in test_rows])
        summary = SynthSummary(
            out=str(out), rows=counts,
            cardinalities={f.name: len(f.cdf) for f in model.fields + model.multi},
            positive_rate=positives / rows, seconds=0.0,
            auc_ceiling=roc_auc(y, test_logits["truth"]),
            auc_cluster_centres=roc_auc(y, test_logits["centre"]),
            auc_random_embeddings=roc_auc(y, test_logits["random"]),
            auc_dense_only=roc_auc(y, predict_logistic(dense_model, x)))
        summary.seconds = round(time.perf_counter() - start, 2)
        atomic_write_text(tmp / "synth.json", json.dumps(asdict(summary), indent=1))
    return summary
