"""Bad input: each case is a DataError (a ValueError) naming the file and the row or column."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mec_torchrec.cli import main
from mec_torchrec.data import DataError, prepare_dataset, synthesize
from mec_torchrec.data.spec import CRITEO_CATEGORICAL, CRITEO_DENSE, load_dataset_spec

CRITEO = {"label": "label", "dense": list(CRITEO_DENSE), "categorical": list(CRITEO_CATEGORICAL)}


def _prepare(spec_path, tmp_path):
    return prepare_dataset(load_dataset_spec(spec_path), tmp_path / "work")


def _tsv_line(label: str = "1", columns: int = 40) -> str:
    fields = [label] + ["3"] * 13 + ["a1b2"] * 26
    return "\t".join(fields[:columns]) + "\n"


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_missing_file(write_spec, tmp_path):
    spec = write_spec(format="parquet", train="nope/*.parquet", label="y", categorical=["f"])
    with pytest.raises(DataError, match=r"split 'train': no file matches '.*nope/\*\.parquet'"):
        _prepare(spec, tmp_path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(DataError, match="spec.*absent.yaml.*does not exist"):
        load_dataset_spec(tmp_path / "absent.yaml")


def test_unreadable_parquet(write_spec, tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet at all")
    spec = write_spec(format="parquet", train="bad.parquet", label="y", categorical=["f"])
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable parquet file"):
        _prepare(spec, tmp_path)


def test_wrong_column_count_in_a_tsv_line(write_spec, tmp_path):
    (tmp_path / "day_0").write_text(_tsv_line() + _tsv_line() + _tsv_line(columns=39))
    spec = write_spec(format="criteo_tsv", train="day_0", **CRITEO)
    with pytest.raises(DataError, match=r"day_0 line 3: expected 40 tab-separated columns, "
                                        r"found 39"):
        _prepare(spec, tmp_path)


def test_non_numeric_label(write_spec, tmp_path):
    (tmp_path / "day_0").write_text(_tsv_line() + _tsv_line(label="yes"))
    spec = write_spec(format="criteo_tsv", train="day_0", **CRITEO)
    with pytest.raises(DataError, match=r"day_0 line 2, column 'label': 'yes' is not a number"):
        _prepare(spec, tmp_path)


def test_non_numeric_dense_value_in_csv(write_spec, tmp_path):
    (tmp_path / "t.csv").write_text("y,x,f\n1,2.5,a\n0,abc,b\n")
    spec = write_spec(format="csv", train="t.csv", label="y", dense=["x"], categorical=["f"])
    with pytest.raises(DataError, match=r"t\.csv line 3, column 'x': 'abc' is not a number"):
        _prepare(spec, tmp_path)


def test_label_other_than_zero_or_one(write_spec, tmp_path):
    pq.write_table(pa.table({"y": [0, 1, 2], "f": [1, 2, 3]}), tmp_path / "t.parquet")
    spec = write_spec(format="parquet", train="t.parquet", label="y", categorical=["f"])
    with pytest.raises(DataError, match=r"t\.parquet row 2, column 'y': label 2.0 is not 0 or 1"):
        _prepare(spec, tmp_path)


def test_spec_column_absent_from_the_file(write_spec, tmp_path):
    pq.write_table(pa.table({"y": [0, 1], "f": [1, 2]}), tmp_path / "t.parquet")
    spec = write_spec(format="parquet", train="t.parquet", label="y", categorical=["f", "g"])
    with pytest.raises(DataError, match=r"t\.parquet: column\(s\) \['g'\] named in the spec"):
        _prepare(spec, tmp_path)


def test_unknown_column_for_a_criteo_format(write_spec):
    spec = write_spec(format="criteo_tsv", train="day_0", label="label", categorical=["C27"])
    with pytest.raises(DataError, match=r"spec\.yaml: unknown column\(s\) \['C27'\]"):
        load_dataset_spec(spec)


def test_unknown_key_in_the_spec(write_spec):
    spec = write_spec(format="parquet", train="t.parquet", label="y", categorical=["f"],
                      min_cout=3)
    with pytest.raises(DataError, match=r"spec\.yaml: unknown key\(s\) \['min_cout'\]"):
        load_dataset_spec(spec)


def test_empty_split(write_spec, tmp_path):
    (tmp_path / "v.csv").write_text("y,f\n")
    spec = write_spec(format="csv", train="v.csv", label="y", categorical=["f"])
    with pytest.raises(DataError, match=r"split 'train': its file\(s\) .*v\.csv.* contain no rows"):
        _prepare(spec, tmp_path)


def test_multi_valued_values_of_the_wrong_type(write_spec, tmp_path):
    tags = pa.array([[], None, [0.5, 1.5]], pa.list_(pa.float64()))
    pq.write_table(pa.table({"y": [0, 1, 0], "f": [1, 2, 3], "tags": tags}),
                   tmp_path / "t.parquet")
    spec = write_spec(format="parquet", train="t.parquet", label="y", categorical=["f"],
                      multi_valued=["tags"])
    with pytest.raises(DataError, match=r"t\.parquet row 2, column 'tags': multi-valued values "
                                        r"have type double"):
        _prepare(spec, tmp_path)


def test_multi_valued_strings_without_a_delimiter(write_spec, tmp_path):
    pq.write_table(pa.table({"y": [0], "f": [1], "tags": ["a|b"]}), tmp_path / "t.parquet")
    spec = write_spec(format="parquet", train="t.parquet", label="y", categorical=["f"],
                      multi_valued=["tags"])
    with pytest.raises(DataError, match=r"t\.parquet: multi-valued column 'tags' holds strings"):
        _prepare(spec, tmp_path)


def test_cli_prints_one_line_and_exits_2(write_spec, tmp_path, capsys):
    (tmp_path / "day_0").write_text(_tsv_line(columns=12))
    spec = write_spec(format="criteo_tsv", train="day_0", **CRITEO)
    assert main(["data", "inspect", "--spec", str(spec), "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.endswith("day_0 line 1: expected 40 tab-separated columns, found 12")


def test_prepare_refuses_to_replace_a_folder_it_did_not_write(write_spec, tmp_path):
    pq.write_table(pa.table({"y": [0, 1], "f": [1, 2]}), tmp_path / "t.parquet")
    spec = write_spec(format="parquet", train="t.parquet", label="y", categorical=["f"])
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="work exists and is not a prepared dataset"):
        _prepare(spec, tmp_path)
    assert (tmp_path / "work" / "notes.txt").read_text() == "mine"


def test_synth_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not the output of `mec data synth`"):
        synthesize(tmp_path, rows=100, scale=0.001, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
