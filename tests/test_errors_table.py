"""docs/errors.md, tested: each bad input there gets exactly the error class and message it lists.

Every row of the doc's table is either a case below (built here, checked by one parametrized
test) or points to an existing test whose source holds the row's message; a test at the end
keeps the doc and this file in sync, so neither can drift from the other.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_export import make_mec
from torchrec import KeyedJaggedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from apps.dlrm.spec import SpecError, load_job_spec
from mec_torchrec import MECEmbeddingBagCollection, MECQuantizer
from mec_torchrec.cli import main as mec_main
from mec_torchrec.data import DataError, prepare_dataset
from mec_torchrec.data.spec import (
    CRITEO_CATEGORICAL,
    CRITEO_DENSE,
    dataset_spec_from_dict,
    load_dataset_spec,
)
from mec_torchrec.export import ArtifactError, MECInferenceEmbeddingBagCollection, export_model
from mec_torchrec.export.format import manifest_checksum
from mec_torchrec.export.reader import read_manifest
from mec_torchrec.modules.config import MECTableConfig
from mec_torchrec.quantize import CompressedTable, TableFileError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class ExitStatus(Exception):
    """A command's exit status and stderr, raised so command rows check like the others."""

    def __init__(self, code: object, stderr: str) -> None:
        super().__init__(f"exit {code}: {stderr.strip()}")
        self.stderr = stderr


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path], Callable[[], object]]  # builds the input under tmp_path
    error: type[BaseException]
    message: str  # the stable part of the message, as docs/errors.md quotes it

    @property
    def error_name(self) -> str:
        return "exit 2" if self.error is ExitStatus else self.error.__name__


def command(main: Callable[[list[str]], int], argv: list[str]) -> Callable[[], object]:
    def run() -> object:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse rejects an argument
                code = e.code
        raise ExitStatus(code, err.getvalue())

    return run


# -- inputs ----------------------------------------------------------------------------------

BASE_SPEC = {"name": "t", "format": "csv", "train": "t.csv", "label": "y", "categorical": ["f"]}


def without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


CRITEO = {"label": "label", "dense": list(CRITEO_DENSE), "categorical": list(CRITEO_CATEGORICAL)}


def prepared(tmp: Path, files: dict[str, bytes | pa.Table], **spec: object) -> Callable[[], object]:
    """Write ``files`` and a dataset spec into ``tmp``; the action prepares the dataset."""
    for name, content in files.items():
        if isinstance(content, pa.Table):
            pq.write_table(content, tmp / name)
        else:
            (tmp / name).write_bytes(content)
    (tmp / "spec.yaml").write_text(yaml.safe_dump({"name": "t", **spec}))
    return lambda: prepare_dataset(load_dataset_spec(tmp / "spec.yaml"), tmp / "work")


def csv(tmp: Path, text: str | bytes, **spec: object) -> Callable[[], object]:
    fields = {"format": "csv", "train": "t.csv", "label": "y", "categorical": ["f"], **spec}
    data = text.encode() if isinstance(text, str) else text
    return prepared(tmp, {"t.csv": data}, **fields)


def dataset_spec_file(tmp: Path, text: str) -> Callable[[], object]:
    (tmp / "s.yaml").write_text(text)
    return lambda: load_dataset_spec(tmp / "s.yaml")


def counts_of(tmp: Path, feature: str) -> Callable[[], object]:
    table = pa.table({"y": [0, 1], "f": [1, 2]})
    prepare = prepared(
        tmp, {"t.parquet": table}, format="parquet", train="t.parquet", label="y", categorical=["f"]
    )
    dataset = prepare()
    return lambda: dataset.counts(feature)


def junk(tmp: Path, name: str) -> str:
    (tmp / name).write_bytes(b"junk")
    return str(tmp / name)


def npy(tmp: Path, dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray) -> Callable:
    for part, array in (("dense", dense), ("sparse", sparse), ("labels", labels)):
        np.save(tmp / f"d_{part}.npy", array)
    return prepared(tmp, {}, format="criteo_npy", train="d_dense.npy", **CRITEO)


def job_spec(tmp: Path, text: str) -> Callable[[], object]:
    (tmp / "job.yaml").write_text(f"data: data.yaml\n{text}")
    return lambda: load_job_spec(tmp / "job.yaml")


def fit(weight: torch.Tensor, counts: torch.Tensor) -> Callable[[], object]:
    return lambda: MECQuantizer(2, 4, epochs=1).fit(weight, counts)


TABLE_META = {"format": "mec_torchrec.CompressedTable", "version": "1", "stats": "{}"}


def table_file(tmp: Path, tensors: dict[str, torch.Tensor], **meta: str) -> Callable[[], object]:
    """A safetensors file in the table format (version 1: no checksum, so every later check
    is reached)."""
    save_file(tensors, str(tmp / "t.safetensors"), metadata={**TABLE_META, **meta})
    return lambda: CompressedTable.load(tmp / "t.safetensors")


def saved_table(tmp: Path, edit: Callable[[bytes], bytes]) -> Callable[[], object]:
    """A table saved by ``CompressedTable.save``, its bytes then passed through ``edit``."""
    codes = torch.tensor([[0, 1], [3, 2], [1, 1]], dtype=torch.uint8)
    CompressedTable(codes, torch.randn(2, 4, 3)).save(tmp / "t.safetensors")
    path = tmp / "t.safetensors"
    path.write_bytes(edit(path.read_bytes()))
    return lambda: CompressedTable.load(path)


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def kjt(
    keys: list[str],
    values: list,
    lengths: list[int],
    weights: list | None = None,
    is_weighted: bool = False,
) -> Callable:
    """The action: a MEC collection (t_a compressed, N = 10; t_b full, N = 5) called on a KJT,
    with the fused kernel and with the TBE path."""
    tables = [
        EmbeddingBagConfig(name="t_a", embedding_dim=8, num_embeddings=10, feature_names=["a"]),
        EmbeddingBagConfig(name="t_b", embedding_dim=4, num_embeddings=5, feature_names=["b"]),
    ]
    modules = [
        MECEmbeddingBagCollection(
            tables, {"t_a": MECTableConfig(2, 4)}, kernel=kernel, is_weighted=is_weighted
        )
        for kernel in ("fused", "tbe")
    ]
    features = KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor(values),
        lengths=torch.tensor(lengths),
        weights=None if weights is None else torch.tensor(weights),
    )

    def run() -> None:  # both kernels must refuse it with the same message
        errors = []
        for module in modules:
            try:
                module(features)
            except ValueError as e:
                errors.append(str(e))
        assert len(errors) == len(modules) and len(set(errors)) == 1, errors
        raise ValueError(errors[0])

    return run


def serving(
    tmp: Path, values: list, lengths: list[int], weighted: bool = False
) -> Callable[[], object]:
    """The action: the serving module of an exported artifact on a KJT (features a..e, or the
    SUM-pooled two of the weighted model)."""
    export_model(make_mec(weighted=weighted), tmp / "art", "fp32")
    module = MECInferenceEmbeddingBagCollection.load(tmp / "art")
    keys = [f for t in module.embedding_bag_configs() for f in t.feature_names]
    features = KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor(values) if values else torch.zeros(0, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64),
    )
    return lambda: module(features)


def state_dict_with_codes(codes: torch.Tensor) -> Callable[[], object]:
    """The action: a MEC collection (t_a: N = 10, L = 2, K = 4) loads a state dict holding
    ``codes``."""
    tables = [
        EmbeddingBagConfig(name="t_a", embedding_dim=8, num_embeddings=10, feature_names=["a"])
    ]
    module = MECEmbeddingBagCollection(tables, {"t_a": MECTableConfig(2, 4)})
    state = {**module.state_dict(), "codes.t_a": codes}
    return lambda: module.load_state_dict(state)


def saved_state_dict(tmp: Path) -> str:
    """A torch.save'd state dict of a MEC collection (tables t_a.. serving features a..)."""
    torch.save(make_mec().state_dict(), tmp / "state.pt")
    return str(tmp / "state.pt")


def export_with_nan(tmp: Path, table: str) -> Callable[[], object]:
    """The action: ``export_model`` of a MEC collection (t_a compressed, t_b full) whose
    ``table`` (an inner EBC table) holds a NaN, as after training diverged."""
    tables = [
        EmbeddingBagConfig(name=n, embedding_dim=8, num_embeddings=10, feature_names=[n[-1]])
        for n in ("t_a", "t_b")
    ]
    module = MECEmbeddingBagCollection(tables, {"t_a": MECTableConfig(2, 4)})
    with torch.no_grad():
        module.codebooks.embedding_bags[table].weight[2, 1] = float("nan")
    return lambda: export_model(module, tmp / "art")


def dlrm_main(
    tmp: Path, *args: str, spec: str = "job.yaml", labels: list[int] | None = None
) -> Callable[[], object]:
    """The action: ``python -m apps.dlrm.main --spec SPEC --out OUT ARGS``, job.yaml naming a
    16-row dataset (with ``labels`` when given)."""
    from apps.dlrm.main import main

    y = labels or [0, 1] * 8
    pq.write_table(pa.table({"y": y, "f": list(range(len(y)))}), tmp / "t.parquet")
    data = {"name": "t", "format": "parquet", "train": "t.parquet", "label": "y"}
    (tmp / "data.yaml").write_text(yaml.safe_dump({**data, "categorical": ["f"]}))
    (tmp / "job.yaml").write_text("data: data.yaml\n")
    return command(main, ["--spec", str(tmp / spec), "--out", str(tmp / "out"), *args])


def exported_with(tmp: Path, edit: Callable[[dict], object], sign: bool) -> Callable[[], object]:
    """The action: serve an exported artifact whose manifest went through ``edit``, then was
    signed again (``sign``: so the checks behind its checksum are reached) or not."""
    export_model(make_mec(), tmp / "art", "fp32")
    path = tmp / "art" / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    if sign:
        raw["manifest_sha256"] = manifest_checksum(raw)
    path.write_text(json.dumps(raw))
    return lambda: MECInferenceEmbeddingBagCollection.load(tmp / "art")


def edited_artifact(tmp: Path, table: str, **fields: object) -> Callable[[], object]:
    """The action: serve an exported artifact whose manifest entry of ``table`` got ``fields``
    (signed again)."""
    return exported_with(
        tmp, lambda raw: next(t for t in raw["tables"] if t["name"] == table).update(fields), True
    )


def manifest(tmp: Path, text: str) -> Callable[[], object]:
    (tmp / "manifest.json").write_text(text)
    return lambda: read_manifest(tmp)


# One case per row of docs/errors.md (hand-aligned: id, input, error, message fragment).
# fmt: off
CASES = [
    # dataset specs
    Case("dataset-spec-non-string-key",
         lambda t: lambda: dataset_spec_from_dict({**BASE_SPEC, 1: "x", "zz": 2}),
         DataError, "unknown key(s) [1, 'zz']"),
    Case("dataset-spec-missing-key",
         lambda t: lambda: dataset_spec_from_dict(without(BASE_SPEC, "label")),
         DataError, "missing required key(s) ['label']"),
    Case("dataset-spec-unknown-format",
         lambda t: lambda: dataset_spec_from_dict({**BASE_SPEC, "format": "xlsx"}),
         DataError, "format 'xlsx' is not one of"),
    Case("dataset-spec-min-count",
         lambda t: lambda: dataset_spec_from_dict({**BASE_SPEC, "min_count": 0}),
         DataError, "min_count must be an integer >= 1, got 0"),
    Case("dataset-spec-column-twice",
         lambda t: lambda: dataset_spec_from_dict({**BASE_SPEC, "categorical": ["f", "y"]}),
         DataError, "column(s) ['y'] named more than once"),
    Case("dataset-spec-csv-delimiter",
         lambda t: lambda: dataset_spec_from_dict({**BASE_SPEC, "csv_delimiter": "\n"}),
         DataError, "csv_delimiter must be a tab or one printable ASCII character"),
    Case("dataset-spec-not-yaml",
         lambda t: dataset_spec_file(t, "name: [unclosed\n"),
         DataError, "s.yaml': not valid YAML"),
    # job specs
    Case("job-spec-non-string-key", lambda t: job_spec(t, "1: 2\nfoo: 3\n"),
         SpecError, "job.yaml: 1: unknown key"),
    Case("job-spec-num-subspaces-zero", lambda t: job_spec(t, "compression: {num_subspaces: 0}\n"),
         SpecError, "compression.num_subspaces: must be >= 1, got 0"),
    Case("job-spec-quantizer-argument",
         lambda t: job_spec(t, "compression: {quantizer: {epoch: 3}}\n"),
         SpecError, "compression.quantizer: MECQuantizer refuses it"),
    Case("job-spec-nan", lambda t: job_spec(t, "training: {dense_lr: .nan}\n"),
         SpecError, "training.dense_lr: expected a finite number, got nan"),
    Case("job-spec-negative-lr", lambda t: job_spec(t, "retrain: {codebook_lr: -0.1}\n"),
         SpecError, "retrain.codebook_lr: must be >= 0, got -0.1"),
    Case("job-spec-max-steps-zero", lambda t: job_spec(t, "training: {max_steps_per_epoch: 0}\n"),
         SpecError, "training.max_steps_per_epoch: must be >= 1, got 0"),
    # data files
    Case("csv-empty-file", lambda t: csv(t, ""), DataError, "contain no rows"),
    Case("csv-infinite-dense", lambda t: csv(t, "y,x,f\n1,inf,a\n", dense=["x"]),
         DataError, "t.csv line 2, column 'x': inf is not a finite number"),
    Case("csv-header-repeats-a-column", lambda t: csv(t, "y,f,f\n1,2,3\n"),
         DataError, "t.csv: column(s) ['f'] appear more than once in the file"),
    Case("csv-unclosed-quote", lambda t: csv(t, 'y,f\n1,"a\n0,b\n1,c\n'),
         DataError, "t.csv line 2, column 'f': a quoted value runs over several lines"),
    Case("csv-invalid-utf8", lambda t: csv(t, b"y,f\n1,\xff\xfe\n"),
         DataError, "t.csv: cannot parse"),
    Case("parquet-float-categorical",
         lambda t: prepared(t, {"t.parquet": pa.table({"y": [0, 1], "f": [1.5, 2.0]})},
                            format="parquet", train="t.parquet", label="y", categorical=["f"]),
         DataError, "t.parquet: categorical column 'f' has type double, expected integers"),
    Case("parquet-dense-list",
         lambda t: prepared(t, {"t.parquet": pa.table({"y": [0], "f": [1], "x": [[1.0]]})},
                            format="parquet", train="t.parquet", label="y", dense=["x"],
                            categorical=["f"]),
         DataError, "t.parquet: column 'x' has type list<element: double>, expected numbers"),
    Case("parquet-uint64-beyond-int64",
         lambda t: prepared(t, {"t.parquet": pa.table({"y": [0, 1], "f": pa.array([3, 2**63],
                                                                                 pa.uint64())})},
                            format="parquet", train="t.parquet", label="y", categorical=["f"]),
         DataError, "t.parquet row 1, column 'f': 9223372036854775808 does not fit int64"),
    Case("npy-float-ids",
         lambda t: npy(t, np.zeros((3, 13), np.float32), np.full((3, 26), 1.5), np.zeros((3, 1))),
         DataError, "d_sparse.npy: dtype float64, expected integers"),
    Case("npy-row-counts-differ",
         lambda t: npy(t, np.zeros((3, 13), np.float32), np.zeros((2, 26), np.int64),
                       np.zeros((3, 1), np.int64)),
         DataError, "d_sparse.npy: 2 rows, but the labels file has 3"),
    Case("npy-wrong-width",
         lambda t: npy(t, np.zeros((3, 12), np.float32), np.zeros((3, 26), np.int64),
                       np.zeros((3, 1), np.int64)),
         DataError, "d_dense.npy: expected shape [N, 13], found [3, 12]"),
    # counts and weights
    Case("fit-weight-not-2d", lambda t: fit(torch.zeros(16), torch.ones(16)),
         ValueError, "weight must be a 2-D tensor [N, D], got (16,)"),
    Case("fit-weight-integer", lambda t: fit(torch.zeros(16, 4, dtype=torch.long), torch.ones(16)),
         ValueError, "weight must be floating point, got torch.int64"),
    Case("fit-weight-too-large", lambda t: fit(torch.randn(16, 4) * 1e20, torch.ones(16)),
         ValueError, "squared distances would overflow float32"),
    Case("fit-counts-nan",
         lambda t: fit(torch.randn(16, 4), torch.tensor([float("nan")] + [1.0] * 15)),
         ValueError, "counts contain NaN/inf"),
    Case("dataset-counts-unknown-feature", lambda t: counts_of(t, "g"),
         DataError, "unknown feature 'g'; features are ['f']"),
    # CompressedTable files
    Case("table-file-missing", lambda t: lambda: CompressedTable.load(t / "absent.safetensors"),
         FileNotFoundError, "absent.safetensors"),
    Case("table-file-truncated", lambda t: saved_table(t, lambda b: b[:-7]),
         TableFileError, "t.safetensors: not a readable safetensors file"),
    Case("table-file-corrupted-byte", lambda t: saved_table(t, flip_last_byte),
         TableFileError, "t.safetensors: sha256 of the tensors and stats does not match"),
    Case("table-file-float-codes",
         lambda t: table_file(t, {"codes": torch.zeros(3, 2), "codebooks": torch.zeros(2, 4, 3)}),
         TableFileError, "t.safetensors: codes must be an integer tensor, got torch.float32"),
    Case("table-file-codes-out-of-range",
         lambda t: table_file(t, {"codes": torch.full((3, 2), 9, dtype=torch.uint8),
                                  "codebooks": torch.zeros(2, 4, 3)}),
         TableFileError, "t.safetensors: codes out of range [0, 4): min 9, max 9"),
    Case("table-file-missing-tensor", lambda t: table_file(t, {"codebooks": torch.zeros(2, 4, 3)}),
         TableFileError, "t.safetensors: holds tensors ['codebooks'], expected"),
    Case("table-file-unknown-version",
         lambda t: table_file(t, {"codes": torch.zeros(3, 2, dtype=torch.uint8),
                                  "codebooks": torch.zeros(2, 4, 3)}, version="9"),
         TableFileError, "t.safetensors: unsupported CompressedTable version '9'"),
    Case("table-file-stats-not-json",
         lambda t: table_file(t, {"codes": torch.zeros(3, 2, dtype=torch.uint8),
                                  "codebooks": torch.zeros(2, 4, 3)}, stats="{oops"),
         TableFileError, "t.safetensors: stats are not valid JSON"),
    # exported artifacts
    Case("artifact-manifest-not-an-object", lambda t: manifest(t, "[]"),
         ArtifactError, "manifest.json: expected a JSON object, got list"),
    Case("artifact-manifest-tensors-not-a-mapping",
         lambda t: manifest(t, '{"format": "mec_torchrec.serving", "format_version": 1, '
                               '"tables": [{"tensors": []}]}'),
         ArtifactError, "manifest.json: malformed manifest"),
    Case("export-nan-codebooks", lambda t: export_with_nan(t, "t_a@1"),
         ValueError, "table 't_a': codebooks contain NaN or inf"),
    Case("export-nan-full-table", lambda t: export_with_nan(t, "t_b"),
         ValueError, "table 't_b': weights contain NaN or inf"),
    Case("artifact-manifest-num-subspaces-zero",
         lambda t: edited_artifact(t, "t_a", num_subspaces=0),
         ArtifactError, "table 't_a' num_subspaces is 0, expected an int >= 1"),
    Case("artifact-manifest-unknown-pooling", lambda t: edited_artifact(t, "t_a", pooling="MAX"),
         ArtifactError, "table 't_a' pooling is 'MAX', expected 'SUM' or 'MEAN'"),
    Case("artifact-manifest-blob-outside",
         lambda t: edited_artifact(t, "t_a", blob="../../etc/passwd"),
         ArtifactError, "blob is '../../etc/passwd', expected a path inside the artifact folder"),
    Case("artifact-manifest-feature-twice",
         lambda t: edited_artifact(t, "t_a", feature_names=["b"]),
         ArtifactError, "the list of feature names is ['b', 'b',"),
    Case("artifact-manifest-edited",
         lambda t: exported_with(t, lambda m: m.update(is_weighted=True), sign=False),
         ArtifactError, "does not match its content"),
    Case("artifact-manifest-no-checksum",
         lambda t: exported_with(t, lambda m: m.pop("manifest_sha256"), sign=False),
         ArtifactError, "manifest.json: no manifest_sha256 (format_version 3 requires one)"),
    # KJTs into MECEmbeddingBagCollection
    Case("kjt-missing-feature", lambda t: kjt(["a"], [1], [1]),
         ValueError, "input KeyedJaggedTensor lacks features ['b']"),
    Case("kjt-lengths-do-not-sum-to-ids", lambda t: kjt(["a", "b"], [1, 2, 3, 4], [1, 1]),
         ValueError, "lengths sum to 2 but there are 4 ids"),
    Case("kjt-negative-length", lambda t: kjt(["a", "b"], [1, 2], [3, -1, 0, 0]),
         ValueError, "negative length -1 in feature 'a' (sample 1)"),
    Case("kjt-float-ids", lambda t: kjt(["a", "b"], [1.0, 2.0], [1, 1]),
         ValueError, "ids must be integers, got torch.float32"),
    Case("kjt-lengths-count", lambda t: kjt(["a", "b"], [1, 2, 3], [1, 1, 1]),
         ValueError, "3 lengths for 2 keys x batch size 1"),
    Case("kjt-weights-count", lambda t: kjt(["a", "b"], [1, 2], [1, 1], weights=[0.5]),
         ValueError, "1 weights for 2 ids"),
    Case("state-dict-codes-out-of-range",
         lambda t: state_dict_with_codes(torch.full((10, 2), 200, dtype=torch.uint8)),
         ValueError, "table 't_a': loaded codes out of range [0, 4): min 200, max 200"),
    Case("kjt-no-weights-for-a-weighted-collection",
         lambda t: kjt(["a", "b"], [1, 2], [1, 1], is_weighted=True),
         ValueError, "input KeyedJaggedTensor has no weights, but is_weighted=True"),
    # KJTs into the serving module
    Case("serving-kjt-lengths-do-not-sum-to-ids",
         lambda t: serving(t, [1, 2, 3, 4, 5, 6, 7], [1, 1, 1, 1, 1]),
         ValueError, "lengths sum to 5 but there are 7 ids"),
    Case("serving-kjt-negative-length",
         lambda t: serving(t, [1, 2, 3, 1, 1, 1], [3, -1, 1, 0, 1, 0, 1, 0, 1, 0]),
         ValueError, "input KeyedJaggedTensor: negative length -1"),
    Case("serving-kjt-float-ids", lambda t: serving(t, [1.0, 2, 3, 4, 5], [1, 1, 1, 1, 1]),
         ValueError, "ids must be integers, got torch.float32"),
    Case("serving-kjt-empty-batch", lambda t: serving(t, [], []),
         ValueError, "input KeyedJaggedTensor: a batch of 0 samples"),
    Case("serving-kjt-no-weights-for-a-weighted-artifact",
         lambda t: serving(t, [1, 2], [1, 1], weighted=True),
         ValueError, "input KeyedJaggedTensor has no weights, but is_weighted=True"),
    # commands
    Case("mec-export-features-not-json",
         lambda t: command(mec_main, ["export", "--checkpoint", str(t), "--out", str(t / "o"),
                                      "--features", "{t_a: [a]}"]),
         ExitStatus, "mec export: error: --features: not valid JSON"),
    Case("mec-export-model-not-a-pickle",
         lambda t: command(mec_main, ["export", "--model", junk(t, "m.pt"), "--out", str(t)]),
         ExitStatus, "m.pt: not a readable torch.save file (UnpicklingError"),
    Case("mec-export-checkpoint-not-a-checkpoint",
         lambda t: command(mec_main, ["export", "--checkpoint", junk(t, "c.pt"), "--out",
                                      str(t / "o")]),
         ExitStatus, "c.pt: not a readable torch.save file"),
    Case("mec-export-feature-twice",
         lambda t: command(mec_main, ["export", "--checkpoint", saved_state_dict(t), "--out",
                                      str(t / "o"), "--features", '{"t_a": ["b"]}']),
         ExitStatus, "mec export: error: features ['b'] are served by several tables"),
    Case("mec-inspect-not-an-artifact", lambda t: command(mec_main, ["inspect", str(t)]),
         ExitStatus, "no manifest.json (not an artifact, or an interrupted export)"),
    Case("mec-synth-too-few-rows",
         lambda t: command(mec_main, ["data", "synth", "--out", str(t / "s"), "--rows", "5"]),
         ExitStatus, "mec data: error: --rows must be at least 10, got 5"),
    Case("mec-synth-scale-not-finite",
         lambda t: command(mec_main, ["data", "synth", "--out", str(t / "s"), "--scale", "nan"]),
         ExitStatus, "mec data: error: --scale must be positive and finite, got nan"),
    Case("mec-argument-not-a-number",
         lambda t: command(mec_main, ["data", "synth", "--out", str(t), "--rows", "many"]),
         ExitStatus, "argument --rows: invalid int value: 'many'"),
    Case("dlrm-main-missing-spec",
         lambda t: dlrm_main(t, spec="absent.yaml"),
         ExitStatus, "absent.yaml: no such job spec"),
    Case("dlrm-main-unknown-stage", lambda t: dlrm_main(t, "--stage", "quantize"),
         ExitStatus, "argument --stage: invalid choice: 'quantize'"),
    Case("dlrm-main-bad-data", lambda t: dlrm_main(t, labels=[0, 1, 3, 1]),
         ExitStatus, "t.parquet row 2, column 'y': label 3.0 is not 0 or 1"),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_its_documented_error(case: Case, tmp_path: Path) -> None:
    action = case.make(tmp_path)
    with pytest.raises(case.error) as err:
        action()
    assert case.message in str(err.value)
    if case.error is ExitStatus:
        assert str(err.value).startswith("exit 2: ")
        assert "Traceback" not in err.value.stderr


# -- the doc ---------------------------------------------------------------------------------


def doc_rows() -> list[dict[str, str]]:
    """The rows of docs/errors.md's tables: id, input, error, message, test (backticks off)."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        ident, _, error, message, test = (c.strip("`") for c in cells)
        rows.append({"id": ident, "error": error, "message": message, "test": test})
    return rows


def test_doc_lists_every_case_with_its_error_and_message() -> None:
    rows = {r["id"]: r for r in doc_rows() if r["test"] == "test_errors_table.py"}
    assert sorted(rows) == sorted(c.id for c in CASES)
    for case in CASES:
        assert (rows[case.id]["error"], rows[case.id]["message"]) == (
            case.error_name,
            case.message,
        ), case.id


def test_doc_rows_of_other_tests_name_a_test_that_checks_their_message() -> None:
    rows = [r for r in doc_rows() if r["test"] != "test_errors_table.py"]
    assert rows
    for row in rows:
        file, _, name = row["test"].partition("::")
        tree = ast.parse((ROOT / "tests" / file).read_text())
        functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
        assert name in functions, row
        source = ast.get_source_segment((ROOT / "tests" / file).read_text(), functions[name])
        # Decorators (parametrize lists) hold messages too; regex escapes are not part of them.
        decorators = "".join(
            ast.get_source_segment((ROOT / "tests" / file).read_text(), d) or ""
            for d in functions[name].decorator_list
        )
        assert row["message"] in re.sub(r"\\(.)", r"\1", decorators + source), row


def test_doc_ids_are_unique_and_at_least_25() -> None:
    ids = [r["id"] for r in doc_rows()]
    assert len(ids) == len(set(ids)) and len(ids) >= 25
