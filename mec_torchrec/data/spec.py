"""Dataset specs: a YAML file loaded into a validated ``DatasetSpec`` dataclass."""

from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mec_torchrec.data.errors import DataError

FORMATS = ("parquet", "csv", "criteo_tsv", "criteo_npy")
DENSE_TRANSFORMS = ("log1p", "none")
SPLITS = ("train", "valid", "test")
# Criteo's fixed column layout (Kaggle/Terabyte TSV, torchrec's preprocessed .npy files).
CRITEO_LABEL = "label"
CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is made of and where its files lie.

    ``train``/``valid``/``test`` hold file paths or globs (relative ones are resolved against the
    spec file's folder). Features are ``categorical`` (one value per row) then ``multi_valued``
    (Arrow list columns, or strings split on ``multi_valued_delimiter``); each gets one table.
    """

    name: str
    format: str
    train: tuple[str, ...]
    label: str
    dense: tuple[str, ...]
    categorical: tuple[str, ...]
    valid: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    multi_valued: tuple[str, ...] = ()
    multi_valued_delimiter: str | None = None
    min_count: int = 1
    dense_transform: str = "log1p"
    csv_delimiter: str = ","
    source: str | None = field(default=None, compare=False)

    @property
    def feature_names(self) -> list[str]:
        return [*self.categorical, *self.multi_valued]

    def split_patterns(self, split: str) -> tuple[str, ...]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, split)

    def files(self, split: str) -> list[Path]:
        """The files of ``split`` (globs expanded, sorted); a pattern matching nothing is an error."""
        files: list[Path] = []
        for pattern in self.split_patterns(split):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DataError(f"split {split!r}: no file matches {pattern!r}")
            files.extend(Path(m) for m in matches)
        return files

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _as_tuple(where: str, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise DataError(f"{where}: {key!r} must be a string or a list of strings, got {value!r}")


def dataset_spec_from_dict(raw: dict[str, Any], base_dir: str | os.PathLike = ".",
                           where: str = "dataset spec") -> DatasetSpec:
    """Validate ``raw`` (a parsed YAML mapping) into a ``DatasetSpec``; paths resolve from ``base_dir``."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(DatasetSpec)} - {"source"}
    unknown = sorted(set(raw) - known, key=str)  # YAML keys need not be strings
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    missing = sorted({"name", "format", "train", "label", "categorical"} - set(raw))
    if missing:
        raise DataError(f"{where}: missing required key(s) {missing}")
    fmt = raw["format"]
    if fmt not in FORMATS:
        raise DataError(f"{where}: format {fmt!r} is not one of {FORMATS}")
    transform = raw.get("dense_transform", "log1p")
    if transform not in DENSE_TRANSFORMS:
        raise DataError(f"{where}: dense_transform {transform!r} is not one of {DENSE_TRANSFORMS}")
    min_count = raw.get("min_count", 1)
    if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 1:
        raise DataError(f"{where}: min_count must be an integer >= 1, got {min_count!r}")

    base = Path(base_dir)
    paths = {
        split: tuple(os.path.normpath(base / p) for p in _as_tuple(where, split, raw.get(split)))
        for split in SPLITS
    }
    if not paths["train"]:
        raise DataError(f"{where}: 'train' names no file")
    columns = {key: _as_tuple(where, key, raw.get(key)) for key in
               ("dense", "categorical", "multi_valued")}
    label = raw["label"]
    if not isinstance(label, str):
        raise DataError(f"{where}: 'label' must be a column name, got {label!r}")
    names = [label, *columns["dense"], *columns["categorical"], *columns["multi_valued"]]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{where}: column(s) {duplicates} named more than once")
    if not columns["categorical"] and not columns["multi_valued"]:
        raise DataError(f"{where}: no categorical feature")
    if fmt in ("criteo_tsv", "criteo_npy"):
        if columns["multi_valued"]:
            raise DataError(f"{where}: format {fmt} has no multi-valued columns")
        fixed = {CRITEO_LABEL, *CRITEO_DENSE, *CRITEO_CATEGORICAL}
        unknown_cols = [n for n in names if n not in fixed]
        if unknown_cols:
            raise DataError(f"{where}: unknown column(s) {unknown_cols} for format {fmt}; its "
                            f"columns are label, I1..I13, C1..C26")
    delimiter = raw.get("multi_valued_delimiter")
    if delimiter is not None and (not isinstance(delimiter, str) or not delimiter):
        raise DataError(f"{where}: multi_valued_delimiter must be a non-empty string")
    csv_delimiter = raw.get("csv_delimiter", ",")
    # pyarrow's CSV parser takes one printable ASCII byte or a tab; '"' quotes values.
    if (not isinstance(csv_delimiter, str) or len(csv_delimiter) != 1 or csv_delimiter == '"'
            or not (csv_delimiter == "\t"
                    or csv_delimiter.isascii() and csv_delimiter.isprintable())):
        raise DataError(f"{where}: csv_delimiter must be a tab or one printable ASCII character "
                        f"other than '\"', got {csv_delimiter!r}")
    return DatasetSpec(
        name=str(raw["name"]), format=fmt, label=label, min_count=min_count,
        dense_transform=transform, multi_valued_delimiter=delimiter, csv_delimiter=csv_delimiter,
        source=None if where == "dataset spec" else where, **paths, **columns,
    )


def load_dataset_spec(path: str | os.PathLike) -> DatasetSpec:
    """Load and validate a dataset spec YAML file (relative data paths resolve from its folder)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset spec {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"dataset spec {str(path)!r}: not valid YAML ({e})") from None
    return dataset_spec_from_dict(raw, base_dir=path.parent, where=str(path))
