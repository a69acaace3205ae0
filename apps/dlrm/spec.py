"""Job specs: the YAML file that says what data, model, compression and training a run uses.

A job spec is loaded into frozen dataclasses by a strict loader: an unknown key, a missing
required key or a value of the wrong type is a ``SpecError`` that names the file and the key
(``specs/x.yaml: training.dense_lr: expected a number, got 'fast'``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class SpecError(ValueError):
    """A job spec that cannot be used; the message names the file and the key at fault."""


@dataclass(frozen=True)
class ModelSpec:
    """DLRM or DLRM_DCN from ``torchrec.models``; every table has ``embedding_dim`` columns."""

    arch: Literal["dlrm", "dlrm_dcn"] = "dlrm"
    embedding_dim: int = 64
    # The last dense layer must equal embedding_dim (DLRM's interaction needs it).
    dense_arch_layer_sizes: list[int] = field(default_factory=lambda: [256, 64])
    over_arch_layer_sizes: list[int] = field(default_factory=lambda: [256, 128, 1])
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 64


@dataclass(frozen=True)
class CompressionSpec:
    """Stage 2: which tables are quantized and how."""

    method: Literal["mec", "pq"] = "mec"
    num_subspaces: int = 4
    # Table name -> its own L (e.g. {t_C4: 8}): more code bytes where the error costs most.
    num_subspaces_per_table: dict[str, int] = field(default_factory=dict)
    codebook_size: int = 256
    # Tables with fewer rows stay full (MEC's cut_down): their codebooks would cost more than they save.
    min_rows: int = 100_000
    # The H most frequent ids of each compressed table get codebook entries of their own and
    # decode exactly (quantize.reserve_exact_rows); the tail keeps K - H entries. 0: none.
    exact_rows: int = 0
    # Fit each table in its loss's metric (quantize.metric): the empirical Fisher of the stage-1
    # model's loss w.r.t. the table's pooled embedding, over this many train samples (all ranks
    # together), one block per subspace. 0: plain squared error.
    fisher_samples: int = 0
    # Added to each normalised Fisher block, in units of the block's mean eigenvalue.
    fisher_ridge: float = 0.05
    # Extra keyword arguments of MECQuantizer / PQQuantizer (epochs, lr, sample size, ...).
    quantizer: dict[str, Any] = field(default_factory=dict)

    def subspaces(self, table: str) -> int:
        """L of ``table``: its own from ``num_subspaces_per_table``, else ``num_subspaces``."""
        return self.num_subspaces_per_table.get(table, self.num_subspaces)

    def make_quantizer(self, table: str) -> Any:
        """The quantizer stage 2 fits ``table`` with (MECQuantizer or PQQuantizer)."""
        from mec_torchrec.quantize import MECQuantizer, PQQuantizer

        cls = MECQuantizer if self.method == "mec" else PQQuantizer
        return cls(
            num_subspaces=self.subspaces(table), codebook_size=self.codebook_size, **self.quantizer
        )


@dataclass(frozen=True)
class TrainingSpec:
    """Stage 1 (pretrain) optimisation. ``batch_size`` is per rank, as in TorchRec's dlrm_main."""

    batch_size: int = 2048
    eval_batch_size: int = 8192
    epochs: int = 1
    # Stop an epoch after this many steps (None: the whole split); for smoke tests and budgets.
    max_steps_per_epoch: int | None = None
    # Evaluate on valid after every this fraction of an epoch; keep the best state.
    eval_every: float = 0.25
    # Stop after this many evaluations without a better valid AUC (0: never stop early).
    patience: int = 0
    # Cap on the valid batches of one evaluation (None: the whole split); test is always whole.
    max_eval_batches: int | None = None
    dense_optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.0
    # Embedding tables train with FBGEMM's fused optimizers (the SGD/Adagrad family on CPU).
    embedding_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd"] = "rowwise_adagrad"
    embedding_lr: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class RetrainSpec(TrainingSpec):
    """Stage 3: codes frozen, codebooks (and the dense layers) trained with the CTR loss.

    ``variants`` lists how the dense layers start: ``warm`` from the pretrained model, ``cold``
    from a fresh initialisation (as in the paper). The first variant is the report's ``mec``.
    """

    variants: list[Literal["warm", "cold"]] = field(default_factory=lambda: ["warm"])
    codebook_lr: float = 0.01
    # Learning rate of the dense layers in the cold variant (warm uses dense_lr).
    cold_dense_lr: float | None = None


@dataclass(frozen=True)
class JobSpec:
    """A whole MEC job. Relative paths are resolved against the spec file's folder."""

    data: str  # dataset spec (YAML) of mec_torchrec.data
    model: ModelSpec = field(default_factory=ModelSpec)
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    retrain: RetrainSpec = field(default_factory=RetrainSpec)
    # Processed data (vocabulary, counts, shards); None: DIR/data under the run's output folder.
    data_dir: str | None = None


def load_job_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec; raises ``SpecError`` naming the file and the key at fault."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such job spec") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    try:
        spec = _build(JobSpec, raw, "")
        _check(spec)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None
    base = path.resolve().parent
    return dataclasses.replace(
        spec,
        data=str(base / spec.data),
        data_dir=None if spec.data_dir is None else str(base / spec.data_dir),
    )


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def _check(spec: JobSpec) -> None:
    m, c = spec.model, spec.compression
    for key in ("embedding_dim", "dcn_num_layers", "dcn_low_rank_dim"):
        _at_least(f"model.{key}", getattr(m, key), 1)
    for key in ("dense_arch_layer_sizes", "over_arch_layer_sizes"):
        for i, size in enumerate(getattr(m, key)):
            _at_least(f"model.{key}[{i}]", size, 1)
    _at_least("compression.num_subspaces", c.num_subspaces, 1)
    _at_least("compression.codebook_size", c.codebook_size, 1)
    _at_least("compression.min_rows", c.min_rows, 0)
    if not 0 <= c.exact_rows < c.codebook_size:
        raise SpecError(
            f"compression.exact_rows: must be in [0, codebook_size) = [0, {c.codebook_size}) "
            f"(the tail needs an entry), got {c.exact_rows}"
        )
    _at_least("compression.fisher_samples", c.fisher_samples, 0)
    if not c.fisher_ridge > 0:
        raise SpecError(f"compression.fisher_ridge: must be > 0, got {c.fisher_ridge}")
    if m.dense_arch_layer_sizes[-1:] != [m.embedding_dim]:
        raise SpecError(
            f"model.dense_arch_layer_sizes: the last size must equal model.embedding_dim "
            f"({m.embedding_dim}), got {m.dense_arch_layer_sizes}"
        )
    if m.over_arch_layer_sizes[-1:] != [1]:
        raise SpecError(
            f"model.over_arch_layer_sizes: must end with 1, got {m.over_arch_layer_sizes}"
        )
    for key, subspaces in [("num_subspaces", c.num_subspaces),
                           *((f"num_subspaces_per_table.{t}", v)
                             for t, v in c.num_subspaces_per_table.items())]:  # fmt: skip
        _at_least(f"compression.{key}", subspaces, 1)
        if m.embedding_dim % subspaces:
            raise SpecError(
                f"compression.{key}: {subspaces} does not divide "
                f"model.embedding_dim {m.embedding_dim}"
            )
    for name in ("training", "retrain"):
        t: TrainingSpec = getattr(spec, name)
        for key in ("batch_size", "eval_batch_size", "epochs"):
            _at_least(f"{name}.{key}", getattr(t, key), 1)
        for key in ("max_steps_per_epoch", "max_eval_batches"):
            if getattr(t, key) is not None:
                _at_least(f"{name}.{key}", getattr(t, key), 1)
        _at_least(f"{name}.patience", t.patience, 0)
        _at_least(f"{name}.dense_weight_decay", t.dense_weight_decay, 0)
        if not 0 < t.eval_every <= 1:
            raise SpecError(f"{name}.eval_every: must be in (0, 1], got {t.eval_every}")
        for key in ("dense_lr", "embedding_lr", "codebook_lr", "cold_dense_lr"):
            if getattr(t, key, None) is not None:  # 0 freezes those parameters
                _at_least(f"{name}.{key}", getattr(t, key), 0)
    if not spec.retrain.variants:
        raise SpecError("retrain.variants: give at least one of 'warm', 'cold'")
    _check_quantizer(c)


def _at_least(key: str, value: float, low: int) -> None:
    if value < low:
        raise SpecError(f"{key}: must be >= {low}, got {value}")


def _check_quantizer(c: CompressionSpec) -> None:
    """Build the stage-2 quantizer now, so a bad argument fails before stage 1 runs."""
    name = "MECQuantizer" if c.method == "mec" else "PQQuantizer"
    try:
        c.make_quantizer("")  # a table of the default L
    except (TypeError, ValueError, RuntimeError) as e:
        raise SpecError(f"compression.quantizer: {name} refuses it: {e}") from None


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise SpecError(f"{where or 'top level'}: expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys need not be strings
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise SpecError(f"{key}: unknown key (expected one of: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in raw:
            values[name] = _convert(hints[name], raw[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{key}: required key is missing")
    return cls(**values)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if origin is Literal:
        if value not in args:
            raise SpecError(f"{key}: expected one of {list(args)}, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{key}: expected a list, got {_show(value)}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise SpecError(f"{key}: expected a mapping with string keys, got {_show(value)}")
        if args and args[1] is not Any:
            return {k: _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{key}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{key}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        # YAML reads 1e-3 (no dot) as a string; accept it as the number it means.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{key}: expected a number, got {_show(value)}")
        if not math.isfinite(value):
            raise SpecError(f"{key}: expected a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"{key}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"{key}: unsupported spec type {tp!r}")


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if value is not None else "null"
