"""Streaming readers: every format becomes a sequence of normalized Arrow record batches.

A normalized batch has the columns ``label`` (float32, 0 or 1), each dense column (float32,
missing -> 0, then the spec's ``dense_transform``), each categorical column (int64 or string,
missing values kept as nulls: "missing" is a value of its own) and each multi-valued column
(list<int64> or list<string>). Files are read in record batches of bounded size, never whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mec_torchrec.data.errors import DataError
from mec_torchrec.data.spec import CRITEO_CATEGORICAL, CRITEO_DENSE, CRITEO_LABEL, DatasetSpec

BATCH_ROWS = 65536  # rows per batch from parquet and .npy files
TEXT_BLOCK_BYTES = 1 << 22  # bytes per batch from csv and tsv files


@dataclass(frozen=True)
class SourceBatch:
    """One normalized record batch and where it came from (for error messages)."""

    path: Path
    first_row: int  # 0-based index of the batch's first data row in the file
    data: pa.RecordBatch


def _row_name(spec: DatasetSpec, path: Path, row: int) -> str:
    """Human position of 0-based data row ``row``: a line number for text files."""
    if spec.format in ("csv", "criteo_tsv"):
        return f"{path} line {row + 1 + (spec.format == 'csv')}"
    return f"{path} row {row}"


def _to_float(spec: DatasetSpec, sb_path: Path, first_row: int, name: str,
              column: pa.Array) -> pa.Array:
    """Cast a label or dense column to float64, naming the first row that is not a number."""
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or \
            pa.types.is_boolean(column.type):
        return pc.cast(column, pa.float64())
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = pc.utf8_trim_whitespace(column)  # " 1" is a number, as for float()
        try:
            return pc.cast(pc.if_else(pc.equal(column, ""), None, column), pa.float64())
        except pa.ArrowInvalid:
            for i, v in enumerate(column.to_pylist()):
                if v not in (None, ""):
                    try:
                        pc.cast(pa.array([v]), pa.float64())
                    except pa.ArrowInvalid:
                        raise DataError(f"{_row_name(spec, sb_path, first_row + i)}, column "
                                        f"{name!r}: {v!r} is not a number") from None
            raise
    raise DataError(f"{sb_path}: column {name!r} has type {column.type}, expected numbers")


def _normalize(spec: DatasetSpec, path: Path, first_row: int, batch: pa.RecordBatch) -> SourceBatch:
    columns: dict[str, pa.Array] = {}
    # Dictionary-encoded columns (pandas categoricals) stand for their values.
    batch = pa.RecordBatch.from_arrays(
        [c.dictionary_decode() if pa.types.is_dictionary(c.type) else c for c in batch.columns],
        names=batch.schema.names)  # fmt: skip
    label = _to_float(spec, path, first_row, spec.label, batch.column(spec.label))
    label_np = label.to_numpy(zero_copy_only=False)
    ok = (label_np == 0) | (label_np == 1)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise DataError(f"{_row_name(spec, path, first_row + i)}, column {spec.label!r}: label "
                        f"{label[i].as_py()!r} is not 0 or 1")
    columns["label"] = pa.array(label_np.astype(np.float32))
    for name in spec.dense:
        values = _to_float(spec, path, first_row, name, batch.column(name))
        x = values.to_numpy(zero_copy_only=False)
        infinite = np.isinf(x)
        if infinite.any():  # NaN is a missing value; inf is not a count or a measurement
            i = int(np.flatnonzero(infinite)[0])
            raise DataError(f"{_row_name(spec, path, first_row + i)}, column {name!r}: {x[i]} "
                            f"is not a finite number")
        x = np.nan_to_num(x, nan=0.0)
        if spec.dense_transform == "log1p":
            x = np.log1p(np.maximum(x, 0.0))
        columns[name] = pa.array(x.astype(np.float32))
    for name in spec.categorical:
        col = batch.column(name)
        if pa.types.is_integer(col.type):
            col = _to_int64(spec, path, first_row, name, col)
        elif pa.types.is_large_string(col.type):
            col = pc.cast(col, pa.string())
        elif not pa.types.is_string(col.type):
            raise DataError(f"{path}: categorical column {name!r} has type {col.type}, expected "
                            f"integers or strings")
        columns[name] = col
    for name in spec.multi_valued:
        columns[name] = _multi_valued(spec, path, first_row, name, batch.column(name))
    return SourceBatch(path, first_row, pa.RecordBatch.from_pydict(columns))


def _to_int64(spec: DatasetSpec, path: Path, first_row: int, name: str, column: pa.Array,
              rows: np.ndarray | None = None) -> pa.Array:
    """Integer values as int64; an unsigned one above 2**63 - 1 is an error naming its row
    (``rows[i]``: the batch row of value ``i``, for flattened lists)."""
    try:
        return pc.cast(column, pa.int64())
    except pa.ArrowInvalid:
        limit = pa.scalar(2**63 - 1, column.type)
        big = pc.fill_null(pc.greater(column, limit), False).to_numpy(zero_copy_only=False)
        i = int(np.flatnonzero(big)[0])
        row = i if rows is None else int(rows[i])
        raise DataError(f"{_row_name(spec, path, first_row + row)}, column {name!r}: "
                        f"{column[i].as_py()} does not fit int64 (store such ids as strings)"
                        ) from None


def _multi_valued(spec: DatasetSpec, path: Path, first_row: int, name: str,
                  col: pa.Array) -> pa.Array:
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        if spec.multi_valued_delimiter is None:
            raise DataError(f"{path}: multi-valued column {name!r} holds strings but the spec sets "
                            f"no multi_valued_delimiter")
        col = pc.split_pattern(pc.cast(col, pa.string()), spec.multi_valued_delimiter)
    if pa.types.is_large_list(col.type):
        col = pc.cast(col, pa.list_(col.type.value_type))
    if not pa.types.is_list(col.type):
        raise DataError(f"{path}: multi-valued column {name!r} has type {col.type}, expected a "
                        f"list of integers or strings, or strings split on a delimiter")
    value_type = col.type.value_type
    if pa.types.is_integer(value_type):
        rows = pc.list_parent_indices(col).to_numpy()
        _to_int64(spec, path, first_row, name, pc.list_flatten(col), rows)
        return pc.cast(col, pa.list_(pa.int64()))
    if pa.types.is_string(value_type) or pa.types.is_large_string(value_type):
        return pc.cast(col, pa.list_(pa.string()))
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy()
    row = int(np.argmax(lengths > 0))  # the first row holding a value of the wrong type
    raise DataError(f"{_row_name(spec, path, first_row + row)}, column {name!r}: multi-valued "
                    f"values have type {value_type}, expected integers or strings")


def _check_columns(spec: DatasetSpec, path: Path, names: list[str]) -> None:
    wanted = [spec.label, *spec.dense, *spec.categorical, *spec.multi_valued]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise DataError(f"{path}: column(s) {missing} named in the spec are not in the file "
                        f"(its columns: {names})")
    repeated = [n for n in wanted if names.count(n) > 1]
    if repeated:
        raise DataError(f"{path}: column(s) {repeated} appear more than once in the file, so "
                        f"which one the spec means is ambiguous")


def _read_parquet(spec: DatasetSpec, path: Path) -> Iterator[pa.RecordBatch]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    _check_columns(spec, path, pf.schema_arrow.names)
    wanted = [spec.label, *spec.dense, *spec.categorical, *spec.multi_valued]
    try:
        yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=wanted)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def _read_text(spec: DatasetSpec, path: Path) -> Iterator[pa.RecordBatch]:
    """CSV with a header, or Criteo TSV (40 tab-separated columns, no header)."""
    bad_rows: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad_rows.append(row)
        return "error"

    tsv = spec.format == "criteo_tsv"
    names = [CRITEO_LABEL, *CRITEO_DENSE, *CRITEO_CATEGORICAL] if tsv else None
    text_columns = [spec.label, *spec.dense, *spec.categorical, *spec.multi_valued]
    read = pacsv.ReadOptions(use_threads=False, block_size=TEXT_BLOCK_BYTES, column_names=names)
    # Criteo's TSV files have no quoting: a '"' is an ordinary character there.
    parse = pacsv.ParseOptions(delimiter="\t" if tsv else spec.csv_delimiter,
                               quote_char=False if tsv else '"', invalid_row_handler=on_invalid)
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in text_columns},
                                   include_columns=text_columns, strings_can_be_null=False)
    try:
        if not tsv:
            header = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 16),
                                    parse_options=pacsv.ParseOptions(delimiter=spec.csv_delimiter))
            _check_columns(spec, path, header.schema.names)
        reader = pacsv.open_csv(path, read_options=read, parse_options=parse,
                                convert_options=convert)
        row = 0
        for batch in reader:
            if not tsv:
                _check_no_newlines(spec, path, row, batch)
            row += batch.num_rows
            yield batch
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:  # column names are decoded as UTF-8
        raise DataError(f"{path}: the header is not UTF-8 text ({e})") from None
    except pa.ArrowInvalid as e:
        if bad_rows:
            row = bad_rows[0]
            where = f"line {row.number}" if row.number is not None else "a line"
            raise DataError(f"{path} {where}: expected {row.expected_columns} "
                            f"{'tab-separated' if tsv else 'delimited'} columns, found "
                            f"{row.actual_columns}") from None
        if "Empty CSV file" in str(e):
            return
        raise DataError(f"{path}: cannot parse ({e})") from None


def _check_no_newlines(spec: DatasetSpec, path: Path, first_row: int,
                       batch: pa.RecordBatch) -> None:
    """Values are parsed without newlines, so one holding a newline began at an unclosed quote
    (pyarrow then takes the rest of the file as that value: rows silently lost). Label and dense
    columns need no check: such a value is not a number, an error of its own."""
    for name in [*spec.categorical, *spec.multi_valued]:
        column = batch.column(name)
        if not _holds_newline(column):
            continue
        found = pc.match_substring(column, "\n")
        if pc.any(found).as_py():
            i = int(np.flatnonzero(found.to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{_row_name(spec, path, first_row + i)}, column {name!r}: a quoted "
                            f"value runs over several lines (a quote that is never closed?)")


def _holds_newline(column: pa.Array) -> bool:
    """Whether a string column's bytes hold a newline: one scan of its data buffer (~GB/s),
    where a per-value substring search costs about as much as parsing the CSV."""
    if column.type != pa.string():
        return True  # let the exact search decide
    _, offsets_buffer, data = column.buffers()
    if data is None:
        return False
    offsets = np.frombuffer(offsets_buffer, np.int32, len(column) + 1, column.offset * 4)
    raw = np.frombuffer(data, np.uint8)[offsets[0] : offsets[-1]]
    return bool((raw == 10).any())


def _read_npy(spec: DatasetSpec, path: Path) -> Iterator[pa.RecordBatch]:
    """torchrec's preprocessed layout: ``X_dense.npy`` [N, 13] float32 (already transformed),
    ``X_sparse.npy`` [N, 26] int, ``X_labels.npy`` [N, 1] int; ``path`` names the dense file."""
    if not path.name.endswith("_dense.npy"):
        raise DataError(f"{path}: criteo_npy paths must name the *_dense.npy files")
    stem = str(path)[: -len("_dense.npy")]
    arrays = {}
    for part, width in (("dense", len(CRITEO_DENSE)), ("sparse", len(CRITEO_CATEGORICAL)),
                        ("labels", 1)):
        file = Path(f"{stem}_{part}.npy")
        try:
            arr = np.load(file, mmap_mode="r")
        except FileNotFoundError:
            raise DataError(f"{file}: file not found (criteo_npy needs _dense, _sparse and "
                            f"_labels files)") from None
        except ValueError as e:
            raise DataError(f"{file}: not a readable .npy file ({e})") from None
        if arr.ndim != 2 or arr.shape[1] != width:
            raise DataError(f"{file}: expected shape [N, {width}], found {list(arr.shape)}")
        kinds = "iu" if part == "sparse" else "iuf"  # float ids would be truncated silently
        if arr.dtype.kind not in kinds:
            raise DataError(f"{file}: dtype {arr.dtype}, expected "
                            f"{'integers' if part == 'sparse' else 'numbers'}")
        arrays[part] = arr
    n = arrays["labels"].shape[0]
    for part in ("dense", "sparse"):
        if arrays[part].shape[0] != n:
            raise DataError(f"{stem}_{part}.npy: {arrays[part].shape[0]} rows, but the labels "
                            f"file has {n}")
    for start in range(0, n, BATCH_ROWS):
        stop = min(n, start + BATCH_ROWS)
        cols = {CRITEO_LABEL: pa.array(np.asarray(arrays["labels"][start:stop, 0]))}
        dense = np.asarray(arrays["dense"][start:stop], dtype=np.float32)
        sparse = np.asarray(arrays["sparse"][start:stop], dtype=np.int64)
        cols.update({name: pa.array(dense[:, j]) for j, name in enumerate(CRITEO_DENSE)})
        cols.update({name: pa.array(sparse[:, j]) for j, name in enumerate(CRITEO_CATEGORICAL)})
        yield pa.RecordBatch.from_pydict(cols)


_READERS = {"parquet": _read_parquet, "csv": _read_text, "criteo_tsv": _read_text,
            "criteo_npy": _read_npy}


def iter_source_batches(spec: DatasetSpec, split: str) -> Iterator[SourceBatch]:
    """Stream ``split`` of ``spec`` as normalized batches; an empty split is an error."""
    files = spec.files(split)
    if not files:
        raise DataError(f"split {split!r}: the spec names no file")
    total = 0
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: file not found (or not a regular file)")
        row = 0
        for batch in _READERS[spec.format](spec, path):
            if batch.num_rows == 0:
                continue
            yield _normalize(spec, path, row, batch)
            row += batch.num_rows
        total += row
    if total == 0:
        raise DataError(f"split {split!r}: its file(s) {[str(f) for f in files]} contain no rows")
