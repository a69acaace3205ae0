"""Property-based tests (hypothesis) of the public readers, loaders, the id remap and exact rows.

Each property: for any input drawn, the code either raises its documented error (see
docs/errors.md) or returns exactly what a small brute-force reference computes; never another
exception, never a silently different result.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_export import make_mec
from torchrec import KeyedJaggedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from apps.dlrm.spec import JobSpec, SpecError, load_job_spec
from mec_torchrec import MECEmbeddingBagCollection
from mec_torchrec.data import DataError, prepare_dataset
from mec_torchrec.data import vocab as vocab_module
from mec_torchrec.data.spec import (
    CRITEO_CATEGORICAL,
    CRITEO_DENSE,
    DatasetSpec,
    dataset_spec_from_dict,
    load_dataset_spec,
)
from mec_torchrec.export import ArtifactError, MECInferenceEmbeddingBagCollection, export_model
from mec_torchrec.export.format import (
    READABLE_VERSIONS,
    decode_weight,
    encode_weight,
    manifest_checksum,
)
from mec_torchrec.modules.config import MECTableConfig
from mec_torchrec.quantize import CompressedTable, TableFileError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
# Fixtures here hold nothing an example changes, so sharing them across examples is fine.
_CHECKS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
# No example database: nothing is written into the working tree (a failure prints its example).
FEW = settings(max_examples=60, deadline=None, suppress_health_check=_CHECKS, database=None)
SOME = settings(FEW, max_examples=150)


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per example (pytest's tmp_path is shared by all examples of a test)."""
    path = Path(tempfile.mkdtemp(prefix="mec-prop-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- readers ---------------------------------------------------------------------------------

# Cells with a known meaning: label and dense cells map to their number (None: a missing value;
# "bad": not a number; "inf": not finite), categorical cells are values as written.
NUMBER_CELLS = {
    "0": 0.0, "1": 1.0, "1.0": 1.0, " 1": 1.0, "0 ": 0.0, "2": 2.0, "-3": -3.0, "2.5": 2.5,
    "1e2": 100.0, ".5": 0.5, "nan": None, "": None, "inf": "inf", "-inf": "inf",
    "abc": "bad", "1.2.3": "bad", "--": "bad", "0x1": "bad",
}  # fmt: skip
VALID_LABELS = ["0", "1", "1.0", " 1", "0 "]
VALID_DENSE = ["0", "2", "-3", "2.5", "1e2", ".5", "nan", ""]
CATEGORY_CELLS = ["a", "b", "c", "", "a b", "12", "B", "é"]
COLUMNS = ["y", "x", "f"]


def mostly(valid: list, every: list) -> st.SearchStrategy:
    """A cell that is valid ~19 times in 20, so that whole files are often valid too."""
    return st.sampled_from(valid * (19 * len(every) // len(valid)) + every)


@st.composite
def csv_tables(draw: st.DrawFn) -> tuple[list[str], list[dict[str, str]]]:
    """A header (a permutation of y, x, f, maybe one dropped, maybe an extra column) and rows."""
    header = draw(st.permutations(COLUMNS))
    if draw(st.booleans()) and draw(st.integers(0, 9)) == 0:
        header = header[1:]
    if draw(st.booleans()):
        header = [*header, "z"]
    number = st.sampled_from(sorted(NUMBER_CELLS))
    cell = {"y": mostly(VALID_LABELS, sorted(NUMBER_CELLS)),
            "x": mostly(VALID_DENSE, sorted(NUMBER_CELLS)),
            "f": st.sampled_from(CATEGORY_CELLS), "z": number}  # fmt: skip
    rows = draw(st.lists(st.fixed_dictionaries({c: cell[c] for c in header}), max_size=12))
    return header, rows


def reference(labels: list, dense: list, categories: list) -> dict | str:
    """What preparing these parsed cells must give, or "error" when some cell is bad.

    ``labels`` / ``dense`` hold NUMBER_CELLS meanings, ``categories`` values (None: missing).
    """
    if not labels:
        return "error"
    for y in labels:
        if y not in (0.0, 1.0):  # None, "bad", "inf" and other numbers alike
            return "error"
    for x in dense:
        if x in ("bad", "inf"):
            return "error"
    counts = Counter(categories)
    # Ids by count descending, ties by value ascending, missing (None) last; then the OOV id.
    order = sorted(counts, key=lambda v: (-counts[v], v is None, "" if v is None else v))
    ids = {v: i for i, v in enumerate(order)}
    x = np.array([0.0 if v is None else v for v in dense], dtype=np.float64)
    return {
        "labels": np.array(labels, dtype=np.float32),
        "dense": np.log1p(np.maximum(x, 0.0)).astype(np.float32),
        "ids": np.array([ids[v] for v in categories], dtype=np.int64),
        "num_embeddings": len(order) + 1,
    }


def prepared_or_error(spec: DatasetSpec, work: Path) -> dict | str:
    """Prepare ``spec`` and read the train split back; "error" for a DataError."""
    try:
        ds = prepare_dataset(spec, work)
    except DataError:
        return "error"
    (batch,) = list(ds.batches("train", 1000))
    return {
        "labels": batch.labels.numpy(),
        "dense": batch.dense_features[:, 0].numpy(),
        "ids": batch.sparse_features["f"].values().numpy(),
        "num_embeddings": ds.num_embeddings["f"],
    }


def assert_same(got: dict | str, expected: dict | str) -> None:
    event("refused" if expected == "error" else "read")
    assert type(got) is type(expected), (got, expected)
    if isinstance(expected, dict):
        for key in ("labels", "dense", "ids"):
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, err_msg=key)
        assert got["num_embeddings"] == expected["num_embeddings"]


@pytest.fixture(params=["hash", "sorted"])
def lookup_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run under both vocabulary lookups (a hash set for small vocabularies, a sorted search)."""
    if request.param == "sorted":
        monkeypatch.setattr(vocab_module, "HASH_LOOKUP_MAX", 0)


@FEW
@given(table=csv_tables())
def test_csv_reads_like_the_reference_or_raises_data_error(table, lookup_path) -> None:
    header, rows = table
    text = ",".join(header) + "\n" + "".join(",".join(r[c] for c in header) + "\n" for r in rows)
    if set(COLUMNS) - set(header):
        expected: dict | str = "error"
    else:
        expected = reference(
            [NUMBER_CELLS[r["y"]] for r in rows],
            [NUMBER_CELLS[r["x"]] for r in rows],
            [r["f"] for r in rows],
        )
    with scratch() as tmp:
        (tmp / "t.csv").write_text(text)
        spec = dataset_spec_from_dict(
            {"name": "p", "format": "csv", "train": "t.csv", "label": "y", "dense": ["x"],
             "categorical": ["f"]}, base_dir=tmp)  # fmt: skip
        assert_same(prepared_or_error(spec, tmp / "work"), expected)


@FEW
@given(
    labels=st.lists(mostly([0, 1], [0, 1, 2, -1, None]), max_size=10),
    data=st.data(),
)
def test_parquet_reads_like_the_reference_or_raises_data_error(labels, data, lookup_path) -> None:
    n = len(labels)
    dense = data.draw(
        st.lists(mostly([0.0, 1.5, -2.0, 7.0, math.nan, None], [math.inf, -math.inf]),
                 min_size=n, max_size=n))  # fmt: skip
    strings = data.draw(st.booleans())
    # "a\0" and "a" are distinct values (NumPy's fixed-width strings would merge them).
    strings_or_ints = ["a", "b", "", "a\0", None] if strings else [5, -1, 0, None]
    value = st.sampled_from(strings_or_ints)
    categories = data.draw(st.lists(value, min_size=n, max_size=n))
    f = pa.array(categories, pa.string() if strings else pa.int64())
    if data.draw(st.booleans()):
        f = f.dictionary_encode()  # as pandas writes a categorical column
    table = pa.table(
        {"y": pa.array(labels, pa.int64()), "x": pa.array(dense, pa.float64()), "f": f}
    )
    expected = reference(
        [float(y) if y is not None else None for y in labels],
        [None if x is None or math.isnan(x) else "inf" if math.isinf(x) else x for x in dense],
        categories,
    )
    with scratch() as tmp:
        pq.write_table(table, tmp / "t.parquet")
        spec = dataset_spec_from_dict(
            {"name": "p", "format": "parquet", "train": "t.parquet", "label": "y", "dense": ["x"],
             "categorical": ["f"]}, base_dir=tmp)  # fmt: skip
        assert_same(prepared_or_error(spec, tmp / "work"), expected)


def bag_ids(bags: list[list]) -> tuple[list[int], list[int], int]:
    """Reference ids of multi-valued bags: (flat ids, bag lengths, num_embeddings)."""
    counts = Counter(v for bag in bags for v in bag)
    order = sorted(counts, key=lambda v: (-counts[v], v is None, "" if v is None else v))
    ids = {v: i for i, v in enumerate(order)}
    return [ids[v] for bag in bags for v in bag], [len(bag) for bag in bags], len(order) + 1


@FEW
@given(
    kind=st.sampled_from(["int lists", "string lists", "csv"]),
    rows=st.lists(st.none() | st.lists(st.sampled_from(["a", "b", "", "a\0", None]), max_size=3),
                  min_size=1, max_size=8),
)  # fmt: skip
def test_multi_valued_reads_like_the_reference(kind: str, rows, lookup_path) -> None:
    """Null lists are empty bags, null or empty values are values; CSV cells split on '|'."""
    spec = {"name": "p", "label": "y", "categorical": [], "multi_valued": ["m"],
            "multi_valued_delimiter": "|"}  # fmt: skip
    labels = [i % 2 for i in range(len(rows))]
    with scratch() as tmp:
        if kind == "csv":
            cells = ["|".join(v or "" for v in bag or []) for bag in rows]
            bags = [cell.split("|") for cell in cells]
            lines = "".join(f"{y},{cell}\n" for y, cell in zip(labels, cells))
            (tmp / "t.csv").write_text("y,m\n" + lines)
            spec.update(format="csv", train="t.csv")
        else:
            if kind == "int lists":
                rows = [None if b is None else [None if v is None else len(v) for v in b]
                        for b in rows]  # fmt: skip
            bags = [bag or [] for bag in rows]
            value_type = pa.int64() if kind == "int lists" else pa.string()
            table = pa.table({"y": labels, "m": pa.array(rows, pa.list_(value_type))})
            pq.write_table(table, tmp / "t.parquet")
            spec.update(format="parquet", train="t.parquet")
        ds = prepare_dataset(dataset_spec_from_dict(spec, base_dir=tmp), tmp / "work")
        (batch,) = list(ds.batches("train", 100))
    ids, lengths, num_embeddings = bag_ids(bags)
    assert batch.sparse_features["m"].values().tolist() == ids
    assert batch.sparse_features["m"].lengths().tolist() == lengths
    assert ds.num_embeddings["m"] == num_embeddings


@FEW
@given(content=st.binary(max_size=300) | st.text(alphabet=',\n"ab01 .\r\t\x00', max_size=120))
@pytest.mark.parametrize("fmt", ["csv", "parquet", "criteo_tsv"])
def test_any_file_content_is_read_or_refused_with_data_error(fmt: str, content) -> None:
    """Garbage, empty files and broken quoting: a DataError naming the file, or rows."""
    data = content.encode() if isinstance(content, str) else content
    with scratch() as tmp:
        (tmp / "t.data").write_bytes(data)
        columns = {"label": "y", "categorical": ["f"]} if fmt != "criteo_tsv" else {
            "label": "label", "categorical": ["C1"]}  # fmt: skip
        spec = dataset_spec_from_dict(
            {"name": "p", "format": fmt, "train": "t.data", **columns}, base_dir=tmp
        )
        try:
            prepare_dataset(spec, tmp / "work")
        except DataError as e:
            assert "t.data" in str(e) or "split 'train'" in str(e), str(e)


NPY_DTYPES = ["int8", "int32", "int64", "uint16", "float16", "float32", "float64", "bool"]


@FEW
@given(
    dtypes=st.tuples(*[st.sampled_from(["float32", "int64"] * 8 + NPY_DTYPES)] * 3),
    widths=st.tuples(mostly([13], [12, 14]), mostly([26], [25]), mostly([1], [2])),
    rows=st.tuples(*[mostly([4], [0, 3])] * 3),
    data=st.data(),
)
def test_criteo_npy_reads_like_the_reference_or_raises_data_error(dtypes, widths, rows,
                                                                  data) -> None:  # fmt: skip
    """torchrec's preprocessed .npy layout of any dtype and shape: refused, or read exactly."""
    arrays = {}
    for part, dtype, width, n in zip(("dense", "sparse", "labels"), dtypes, widths, rows):
        cell = mostly([0, 1], [2]) if part == "labels" else st.integers(0, 2)
        cells = data.draw(st.lists(cell, min_size=n * width, max_size=n * width))
        arrays[part] = np.asarray(cells, dtype=dtype).reshape(n, width)
    valid = (
        widths == (13, 26, 1)
        and rows[0] == rows[1] == rows[2] > 0
        and arrays["sparse"].dtype.kind in "iu"
        and arrays["dense"].dtype.kind in "iuf"
        and arrays["labels"].dtype.kind in "iuf"
        and set(arrays["labels"].ravel().tolist()) <= {0, 1}
    )
    event("read" if valid else "refused")
    with scratch() as tmp:
        for part, array in arrays.items():
            np.save(tmp / f"d_{part}.npy", array)
        spec = dataset_spec_from_dict(
            {"name": "p", "format": "criteo_npy", "train": "d_dense.npy", "label": "label",
             "dense": list(CRITEO_DENSE), "categorical": list(CRITEO_CATEGORICAL),
             "dense_transform": "none"}, base_dir=tmp)  # fmt: skip
        try:
            ds = prepare_dataset(spec, tmp / "work")
        except DataError as e:
            assert not valid, e
            assert "d_" in str(e), str(e)
            return
        assert valid
        (batch,) = list(ds.batches("train", 100))
    assert batch.labels.tolist() == arrays["labels"].ravel().astype(float).tolist()
    assert batch.dense_features.numpy().tolist() == arrays["dense"].astype(np.float32).tolist()
    ids, _, _ = bag_ids([[v] for v in arrays["sparse"][:, 0].tolist()])
    assert batch.sparse_features["C1"].values().tolist() == ids


# -- spec loaders ----------------------------------------------------------------------------

DATASET_KEYS = ["name", "format", "train", "valid", "label", "dense", "categorical",
                "multi_valued", "multi_valued_delimiter", "min_count", "dense_transform",
                "csv_delimiter", "bogus"]  # fmt: skip
SCALARS = (
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True)
    | st.text(max_size=6)
    | st.sampled_from(["csv", "parquet", "criteo_tsv", "log1p", "C1", "I1", ";", "\x00", "\n"])
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@SOME
@given(raw=st.dictionaries(st.sampled_from(DATASET_KEYS) | st.integers(0, 3), VALUES,
                           max_size=10))  # fmt: skip
def test_dataset_spec_loader_validates_any_mapping(raw) -> None:
    try:
        spec = dataset_spec_from_dict(raw)
    except DataError:
        return
    assert spec.format in ("parquet", "csv", "criteo_tsv", "criteo_npy")
    assert isinstance(spec.label, str) and spec.train
    assert isinstance(spec.min_count, int) and spec.min_count >= 1
    names = [spec.label, *spec.dense, *spec.categorical, *spec.multi_valued]
    assert all(isinstance(n, str) for n in names) and len(names) == len(set(names))
    pacsv.ParseOptions(delimiter=spec.csv_delimiter)  # the reader can use it


JOB_SECTIONS = {
    "model": ["arch", "embedding_dim", "dense_arch_layer_sizes", "over_arch_layer_sizes"],
    "compression": ["method", "num_subspaces", "codebook_size", "min_rows", "quantizer"],
    "training": ["batch_size", "epochs", "eval_every", "dense_lr", "max_steps_per_epoch",
                 "patience"],
    "retrain": ["variants", "codebook_lr", "epochs"],
}  # fmt: skip
JOB_VALUES = VALUES | st.sampled_from([64, 16, 4, 0, -1, 0.5, 1e-3, [64], [16, 1], ["warm"]])


@st.composite
def job_specs(draw: st.DrawFn) -> dict:
    raw: dict = {} if draw(st.integers(0, 9)) == 0 else {"data": "data.yaml"}
    for section, keys in JOB_SECTIONS.items():
        if draw(st.booleans()):
            fields = st.dictionaries(st.sampled_from([*keys, "bogus"]), JOB_VALUES, max_size=3)
            raw[section] = draw(fields | JOB_VALUES)
    if draw(st.integers(0, 9)) == 0:
        raw[draw(st.integers(0, 3) | st.text(max_size=3))] = draw(JOB_VALUES)
    return raw


@SOME
@given(raw=job_specs())
def test_job_spec_loader_validates_any_yaml(raw) -> None:
    with scratch() as tmp:
        (tmp / "job.yaml").write_text(yaml.safe_dump(raw))
        try:
            spec = load_job_spec(tmp / "job.yaml")
        except SpecError as e:
            assert str(e).startswith(f"{tmp / 'job.yaml'}: "), str(e)
            return
    assert isinstance(spec, JobSpec)
    m, c = spec.model, spec.compression
    assert m.embedding_dim >= 1 and c.num_subspaces >= 1 and m.embedding_dim % c.num_subspaces == 0
    assert m.dense_arch_layer_sizes[-1] == m.embedding_dim and m.over_arch_layer_sizes[-1] == 1
    for t in (spec.training, spec.retrain):
        assert t.batch_size >= 1 and t.epochs >= 1 and 0 < t.eval_every <= 1
        assert all(math.isfinite(v) and v >= 0 for v in (t.dense_lr, t.embedding_lr))


@FEW
@given(text=st.text(alphabet="abc:[]{}-, \n\t'\"1", max_size=60))
def test_any_yaml_text_is_a_spec_or_a_clear_error(text: str) -> None:
    with scratch() as tmp:
        (tmp / "s.yaml").write_text(text)
        with pytest.raises(DataError, match="s.yaml"):
            load_dataset_spec(tmp / "s.yaml")  # no text of this alphabet names a train file
        (tmp / "job.yaml").write_text(text)
        try:
            load_job_spec(tmp / "job.yaml")
        except SpecError as e:
            assert "job.yaml" in str(e)


# -- CompressedTable files -------------------------------------------------------------------


@pytest.fixture(scope="module", params=[16, 300], ids=["uint8 codes", "int16 codes"])
def saved_table(request: pytest.FixtureRequest) -> Iterator[tuple[CompressedTable, bytes]]:
    g = torch.Generator().manual_seed(0)
    k = request.param
    table = CompressedTable(
        torch.randint(0, k, (40, 4), generator=g, dtype=torch.int64),
        torch.randn(4, k, 2, generator=g),
        {"mse": 0.25, "perplexity": [3.5, 4.0]},
    )
    with scratch() as tmp:
        table.save(tmp / "t.safetensors")
        yield table, (tmp / "t.safetensors").read_bytes()


def same_table(a: CompressedTable, b: CompressedTable) -> bool:
    return (
        a.codes.dtype == b.codes.dtype
        and torch.equal(a.codes, b.codes)
        and torch.equal(a.codebooks.view(torch.int32), b.codebooks.view(torch.int32))
        and a.stats == b.stats
    )


def test_version_1_files_without_a_checksum_still_load(saved_table) -> None:
    """Files written before the checksum (format version 1) load as they were."""
    table, _ = saved_table
    meta = {"format": "mec_torchrec.CompressedTable", "version": "1",
            "stats": json.dumps(table.stats, sort_keys=True)}  # fmt: skip
    with scratch() as tmp:
        save_file({"codes": table.codes, "codebooks": table.codebooks},
                  str(tmp / "v1.safetensors"), metadata=meta)  # fmt: skip
        assert same_table(CompressedTable.load(tmp / "v1.safetensors"), table)


@st.composite
def corruptions(draw: st.DrawFn, size: int) -> list[tuple[int, int]] | int:
    """1 or 2 bytes overwritten anywhere, or a truncation to fewer bytes (an int)."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.integers(0, size - 1))
    edits = st.tuples(st.integers(0, size - 1), st.integers(0, 255))
    return draw(st.lists(edits, min_size=1, max_size=2))


@SOME
@given(data=st.data())
def test_a_corrupted_table_file_is_refused_or_loads_identical(saved_table, data) -> None:
    table, original = saved_table
    corruption = data.draw(corruptions(len(original)))
    if isinstance(corruption, int):
        corrupted = original[:corruption]
    else:
        buffer = bytearray(original)
        for position, value in corruption:
            buffer[position] = value
        corrupted = bytes(buffer)
    with scratch() as tmp:
        (tmp / "t.safetensors").write_bytes(corrupted)
        try:
            loaded = CompressedTable.load(tmp / "t.safetensors")
        except TableFileError as e:
            assert str(tmp / "t.safetensors") in str(e)
            return
    assert same_table(loaded, table), corruption


@FEW
@given(data=st.data())
def test_corrupted_tensor_bytes_are_always_refused(saved_table, data) -> None:
    _, original = saved_table
    header = 8 + int.from_bytes(original[:8], "little")
    positions = data.draw(st.lists(st.integers(header, len(original) - 1), min_size=1,
                                   max_size=8, unique=True))  # fmt: skip
    buffer = bytearray(original)
    for p in positions:
        buffer[p] ^= data.draw(st.integers(1, 255))
    with scratch() as tmp:
        (tmp / "t.safetensors").write_bytes(bytes(buffer))
        with pytest.raises(TableFileError, match="sha256"):
            CompressedTable.load(tmp / "t.safetensors")


# -- serving artifacts -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact() -> Iterator[Path]:
    with scratch() as tmp:
        export_model(make_mec(), tmp / "art", "int8")
        yield tmp / "art"


MANIFEST_VALUES = st.sampled_from(
    [0, 1, -1, 4, 16, 500, 2.5, True, None, "", "x", "SUM", "MEAN", "uint8", "int8", "fp16",
     "../t.safetensors", "tables/t_b.safetensors", [], ["a"], ["b", "c"], {}, [500, 4]]
)  # fmt: skip
TABLE_FIELDS = ["name", "feature_names", "num_embeddings", "embedding_dim", "pooling", "blob",
                "blob_bytes", "sha256", "tensors", "num_subspaces", "codebook_size", "code_dtype",
                "codebook_dtype"]  # fmt: skip


def test_a_manifest_whose_L_does_not_divide_the_dim_is_refused_naming_the_blob(artifact: Path):
    # Found by the property below: this error named the table but not the artifact's path.
    raw = json.loads((artifact / "manifest.json").read_text())
    table = next(t for t in raw["tables"] if t.get("num_subspaces"))
    table["num_subspaces"] = table["embedding_dim"] * 2
    raw["manifest_sha256"] = manifest_checksum(raw)
    with scratch() as tmp:
        shutil.copytree(artifact, tmp / "art")
        (tmp / "art" / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(ArtifactError, match="not divisible by L=") as error:
            MECInferenceEmbeddingBagCollection.load(tmp / "art")
        assert str(tmp / "art") in str(error.value)


def edit_fields(raw: dict, data) -> None:
    """1-3 random edits (or deletions) of a manifest's fields, its tables' and their tensors'."""
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["top", "table", "tensor"]))
        if where == "top":
            target = raw
            key = data.draw(st.sampled_from(["tables", "is_weighted", "unknown_id_policy",
                                             "format_version"]))  # fmt: skip
        else:
            target = data.draw(st.sampled_from(raw["tables"]))
            if not isinstance(target, dict):
                continue
            key = data.draw(st.sampled_from(TABLE_FIELDS))
            if where == "tensor" and isinstance(target.get("tensors"), dict) and target["tensors"]:
                target = target["tensors"][data.draw(st.sampled_from(sorted(target["tensors"])))]
                key = data.draw(st.sampled_from(["dtype", "shape"]))
        if not isinstance(target, dict):
            continue
        if data.draw(st.integers(0, 5)) == 0:
            target.pop(key, None)
        else:
            target[key] = data.draw(MANIFEST_VALUES)
        if not isinstance(raw.get("tables"), list) or not raw["tables"]:
            break  # no tables left to edit (the edit made it a non-list or empty)


@FEW
@given(data=st.data())
def test_an_edited_manifest_is_refused_or_served(artifact: Path, data) -> None:
    """Any 1-3 field edits (or deletions), signed again: an ArtifactError, or a module that
    serves its own features (a well-formed edit whose checksum was recomputed is served as
    written: the checksum catches edits, not a tool that signs them)."""
    raw = json.loads((artifact / "manifest.json").read_text())
    edit_fields(raw, data)
    raw["manifest_sha256"] = manifest_checksum(raw)
    with scratch() as tmp:
        shutil.copytree(artifact, tmp / "art")
        (tmp / "art" / "manifest.json").write_text(json.dumps(raw))
        try:
            serving = MECInferenceEmbeddingBagCollection.load(tmp / "art")
        except ArtifactError as e:
            assert str(tmp / "art") in str(e), str(e)
            return
    keys = [f for t in serving.embedding_bag_configs() for f in t.feature_names]
    # An edit may flip is_weighted: such a module serves weighted requests (and refuses others).
    weights = torch.ones(len(keys)) if serving.is_weighted() else None
    kjt = KeyedJaggedTensor(keys=keys, values=torch.zeros(len(keys), dtype=torch.int64),
                            lengths=torch.ones(len(keys), dtype=torch.int64),
                            weights=weights)  # fmt: skip
    assert serving(kjt).values().shape[0] == 1


@FEW
@given(data=st.data())
def test_an_unsigned_manifest_edit_is_refused(artifact: Path, data) -> None:
    """Any 1-3 field edits (or deletions), not signed again: refused by the checksum, naming the
    file (or by the version check first, when format_version became one this code does not
    read), unless the edits left the content as it was."""
    raw = json.loads((artifact / "manifest.json").read_text())
    edit_fields(raw, data)
    version = raw.get("format_version")
    readable = type(version) is int and version in READABLE_VERSIONS
    with scratch() as tmp:
        shutil.copytree(artifact, tmp / "art")
        (tmp / "art" / "manifest.json").write_text(json.dumps(raw))
        if manifest_checksum(raw) == raw["manifest_sha256"]:  # e.g. a 500 set to 500
            event("content unchanged")
            MECInferenceEmbeddingBagCollection.load(tmp / "art")
            return
        message = "does not match its content" if readable else "is not supported"
        with pytest.raises(ArtifactError, match=message) as error:
            MECInferenceEmbeddingBagCollection.load(tmp / "art")
        assert str(tmp / "art" / "manifest.json") in str(error.value)


# -- id remap --------------------------------------------------------------------------------


@st.composite
def mec_setups(draw: st.DrawFn) -> tuple[list[EmbeddingBagConfig], dict[str, MECTableConfig]]:
    tables, compression = [], {}
    for t in range(draw(st.integers(1, 3))):
        num_subspaces = draw(st.sampled_from([1, 2, 4]))
        features = [f"f{t}_{i}" for i in range(draw(st.integers(1, 2)))]
        tables.append(
            EmbeddingBagConfig(
                name=f"t{t}",
                embedding_dim=4 * num_subspaces,
                num_embeddings=draw(st.integers(1, 12)),
                feature_names=features,
                pooling=draw(st.sampled_from([PoolingType.SUM, PoolingType.MEAN])),
            )
        )
        if draw(st.booleans()):
            compression[f"t{t}"] = MECTableConfig(num_subspaces, draw(st.integers(1, 8)))
    return tables, compression


@dataclass
class Lookup:
    """A drawn KJT for a MEC collection and what a brute-force reading of it gives."""

    module: MECEmbeddingBagCollection
    kjt: KeyedJaggedTensor
    ids: dict[str, list[int]]  # per feature, as drawn (out-of-range ones included)
    lengths: dict[str, list[int]]
    first_bad: str | None  # the out-of-range message the module must raise, if any

    def served(self, feature: str) -> list[int]:
        """The rows read: an out-of-range id reads the table's last row (policy "reserved")."""
        n = self.size(feature)
        return [i if 0 <= i < n else n - 1 for i in self.ids[feature]]

    def size(self, feature: str) -> int:
        return self.table(feature).num_embeddings

    def table(self, feature: str) -> EmbeddingBagConfig:
        return next(t for t in self.module.embedding_bag_configs() if feature in t.feature_names)

    def pooled(self) -> dict[str, torch.Tensor]:
        """Per feature [B, D]: each bag's decoded rows summed (or averaged), brute force."""
        decompressed = self.module.decompress()
        out = {}
        for f, lengths in self.lengths.items():
            t, rows, start, bags = self.table(f), self.served(f), 0, []
            weight = decompressed.embedding_bags[t.name].weight.detach()
            for n in lengths:
                bag = weight[rows[start : start + n]].sum(0)
                start += n
                bags.append(bag / n if t.pooling == PoolingType.MEAN and n else bag)
            out[f] = torch.stack(bags) if bags else weight.new_zeros(0, t.embedding_dim)
        return out


@st.composite
def lookups(draw: st.DrawFn, policy: str, min_batch: int = 0) -> Lookup:
    tables, compression = draw(mec_setups())
    torch.manual_seed(draw(st.integers(0, 2**16)))  # random codes and codebooks
    module = MECEmbeddingBagCollection(tables, compression, unknown_id_policy=policy)
    size = {f: t.num_embeddings for t in tables for f in t.feature_names}
    keys = draw(st.permutations(list(size)))
    batch = draw(st.integers(min_batch, 3))
    lengths = {f: draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch)) for f in keys}
    ids = {f: draw(st.lists(st.integers(-3, size[f] + 2), min_size=sum(lengths[f]),
                            max_size=sum(lengths[f]))) for f in keys}  # fmt: skip
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor([i for f in keys for i in ids[f]], dtype=torch.int64),
        lengths=torch.tensor([n for f in keys for n in lengths[f]], dtype=torch.int64),
        stride=batch,
    )
    order = [(t.name, f) for t in tables for f in t.feature_names]  # the module's feature order
    bad = [(t, f, i) for t, f in order for i in ids[f] if not 0 <= i < size[f]]
    first_bad = None
    if bad and policy == "error":
        t, f, i = bad[0]
        first_bad = f"table '{t}': id {i} out of range [0, {size[f]}) in feature '{f}'"
    return Lookup(module, kjt, ids, lengths, first_bad)


def by_key(kjt: KeyedJaggedTensor) -> dict[str, tuple[list[int], list[int]]]:
    """Per key: (values, lengths); unlike ``to_dict`` it works for a batch of 0 too."""
    values = kjt.values().split(kjt.length_per_key())
    lengths = kjt.lengths().view(len(kjt.keys()), kjt.stride())
    return {k: (values[i].tolist(), lengths[i].tolist()) for i, k in enumerate(kjt.keys())}


@FEW
@given(data=st.data(), policy=st.sampled_from(["error", "reserved"]))
def test_remap_and_lookup_match_a_brute_force_reference(data, policy: str) -> None:
    case = data.draw(lookups(policy))
    module = case.module
    if case.first_bad:
        for call in (module.remap, module):
            with pytest.raises(ValueError, match=re.escape(case.first_bad)):
                call(case.kjt)
        return
    remapped = by_key(module.remap(case.kjt))
    for f in case.ids:
        name = case.table(f).name
        if name in module.compression:
            codes = getattr(module.codes, name)
            for sub in range(module.compression[name].num_subspaces):
                expected = [int(codes[i, sub]) for i in case.served(f)]
                assert remapped[f"{f}@{sub}"] == (expected, case.lengths[f])
        else:
            assert remapped[f] == (case.served(f), case.lengths[f])
    expected = case.pooled()
    for kernel in ("fused", "tbe"):
        configs = module.embedding_bag_configs()
        same = MECEmbeddingBagCollection(configs, module.compression, unknown_id_policy=policy,
                                         kernel=kernel)  # fmt: skip
        same.load_state_dict(module.state_dict())
        out = same(case.kjt).to_dict()
        for f in case.ids:
            torch.testing.assert_close(out[f], expected[f], atol=1e-5, rtol=1e-5)


@settings(FEW, max_examples=25)
@given(data=st.data(), policy=st.sampled_from(["error", "reserved"]),
       weight_dtype=st.sampled_from(["fp32", "int8"]))
def test_serving_module_matches_a_brute_force_reference(data, policy: str,
                                                        weight_dtype: str) -> None:
    """The exported artifact (fp32 codebooks; full tables fp32 or int8 row-wise), served per
    table and stacked where it can be (on CPU the stacked layout runs the C++ kernels). Batches
    are not empty: like torchrec's own EBC, serving needs B >= 1."""
    case = data.draw(lookups(policy, min_batch=1))
    with scratch() as tmp:
        export_model(case.module, tmp / "art", weight_dtype=weight_dtype)
        servings = [
            MECInferenceEmbeddingBagCollection.load(tmp / "art", fused=fused)
            for fused in (False, None)
        ]
    reference = case
    if weight_dtype == "int8":  # the rows served are the int8 ones: the reference reads them too
        module = copy.deepcopy(case.module)
        for name, bag in module.codebooks.embedding_bags.items():
            if "@" in name:  # a codebook (t@l); full tables keep their own name
                continue
            bag.weight.data.copy_(decode_weight(encode_weight(bag.weight.detach(), "int8")))
        reference = replace(case, module=module)
    for serving in servings:
        if case.first_bad:
            with pytest.raises(ValueError, match=re.escape(case.first_bad)):
                serving(case.kjt)
            continue
        out = serving(case.kjt).to_dict()
        expected = reference.pooled()
        for f in case.ids:
            torch.testing.assert_close(out[f], expected[f], atol=1e-5, rtol=1e-5)


# -- exact head rows -------------------------------------------------------------------------


@FEW
@given(data=st.data())
def test_reserved_exact_rows_decode_exactly_and_the_tail_keeps_its_own_entries(data) -> None:
    """Any table, counts (ties included) and 0 < H < K, H <= N: the H rows a brute-force sort
    ranks first (count descending, then id) decode to their weights, each on entries of its own;
    every other row sits on a kept entry, at the (weighted) mean of the rows that share it."""
    from mec_torchrec.quantize import reserve_exact_rows

    n = data.draw(st.integers(1, 40), label="N")
    subspaces, sub_dim = data.draw(st.sampled_from([(1, 2), (2, 1), (2, 3)]), label="L, d")
    size = data.draw(st.integers(2, 12), label="K")
    exact = data.draw(st.integers(1, min(size - 1, n)), label="H")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(-4, 5, (n, subspaces * sub_dim), generator=g).float()
    counts = torch.tensor(data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)))
    codes = torch.randint(size, (n, subspaces), generator=g)
    table = CompressedTable(codes, torch.randn(subspaces, size, sub_dim, generator=g))
    row_weight = data.draw(st.sampled_from([None, "counts"]))
    refit = None if row_weight is None else counts.double().clamp_min(1)
    out = reserve_exact_rows(weight, counts, table, exact, refit)

    head = sorted(range(n), key=lambda i: (-int(counts[i]), i))[:exact]
    assert torch.equal(out.decode(torch.tensor(head)), weight[head])
    tail = [i for i in range(n) if i not in set(head)]
    w = torch.ones(n, dtype=torch.float64) if refit is None else refit
    for sub in range(subspaces):
        head_entries = {int(out.codes[i, sub]) for i in head}
        assert len(head_entries) == exact
        cols = slice(sub * sub_dim, (sub + 1) * sub_dim)
        for i in tail:
            entry = int(out.codes[i, sub])
            assert entry not in head_entries
            rows = [j for j in tail if int(out.codes[j, sub]) == entry]
            mean = (weight[rows, cols].double() * w[rows, None]).sum(0) / w[rows].sum()
            torch.testing.assert_close(out.codebooks[sub, entry].double(), mean, atol=1e-5,
                                       rtol=1e-5)
