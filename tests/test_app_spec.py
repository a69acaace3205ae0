"""Job specs of the DLRM app: the shipped specs load, and every mistake names its key."""

import re
from pathlib import Path

import pytest

from apps.dlrm.spec import JobSpec, SpecError, load_job_spec

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["synthetic.yaml", "criteo_kaggle.yaml", "criteo_terabyte.yaml", "avazu.yaml"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_specs_load_and_point_at_existing_dataset_specs(name: str) -> None:
    spec = load_job_spec(ROOT / "specs" / name)
    assert isinstance(spec, JobSpec)
    assert Path(spec.data).is_file()


def test_minimal_spec_takes_defaults_and_resolves_paths_beside_the_file(tmp_path: Path) -> None:
    spec = load_job_spec(write(tmp_path, "data: data/x.yaml\ndata_dir: prepared\n"))
    assert spec.data == str(tmp_path / "data" / "x.yaml")
    assert spec.data_dir == str(tmp_path / "prepared")
    assert spec.model.arch == "dlrm"
    assert spec.retrain.variants == ["warm"]


def test_yaml_exponent_without_dot_is_read_as_a_number(tmp_path: Path) -> None:
    spec = load_job_spec(write(tmp_path, "data: x.yaml\ntraining: {dense_lr: 1e-4}\n"))
    assert spec.training.dense_lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data: x.yaml\nbogus: 1\n", "bogus: unknown key"),
        ("data: x.yaml\ntraining: {learning_rate: 0.1}\n", "training.learning_rate: unknown key"),
        ("data: x.yaml\ntraining: {batch_size: big}\n", "training.batch_size: expected an integer"),
        ("data: x.yaml\ntraining: {batch_size: 2.5}\n", "training.batch_size: expected an integer"),
        (
            "data: x.yaml\ntraining: {batch_size: true}\n",
            "training.batch_size: expected an integer",
        ),
        ("data: x.yaml\ntraining: {dense_lr: fast}\n", "training.dense_lr: expected a number"),
        ("data: x.yaml\nmodel: {arch: dcn}\n", "model.arch: expected one of ['dlrm', 'dlrm_dcn']"),
        (
            "data: x.yaml\nmodel: {over_arch_layer_sizes: 5}\n",
            "model.over_arch_layer_sizes: expected a list",
        ),
        (
            "data: x.yaml\nmodel: {dense_arch_layer_sizes: [8, x]}\n",
            "model.dense_arch_layer_sizes[1]",
        ),
        ("data: x.yaml\nretrain: {variants: [hot]}\n", "retrain.variants[0]: expected one of"),
        ("data: x.yaml\ncompression: [1, 2]\n", "compression: expected a mapping"),
        (
            "data: x.yaml\ncompression: {quantizer: 3}\n",
            "compression.quantizer: expected a mapping",
        ),
        ("data: 7\n", "data: expected a string"),
        ("model: {arch: dlrm}\n", "data: required key is missing"),
        ("- a list\n", "top level: expected a mapping"),
    ],
)
def test_bad_spec_is_an_error_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_job_spec(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: {embedding_dim: 32}", "model.dense_arch_layer_sizes: the last size must equal"),
        ("model: {over_arch_layer_sizes: [16, 2]}", "model.over_arch_layer_sizes: must end with 1"),
        ("compression: {num_subspaces: 5}", "compression.num_subspaces: 5 does not divide"),
        ("compression: {exact_rows: 256}", "compression.exact_rows: must be in [0, codebook_size)"),
        ("compression: {fisher_samples: -1}", "compression.fisher_samples: must be >= 0, got -1"),
        ("compression: {fisher_ridge: 0}", "compression.fisher_ridge: must be > 0, got 0.0"),
        ("compression: {num_subspaces_per_table: {t_C4: 5}}",
         "compression.num_subspaces_per_table.t_C4: 5 does not divide"),
        ("compression: {num_subspaces_per_table: {t_C4: 0}}",
         "compression.num_subspaces_per_table.t_C4: must be >= 1"),
        ("training: {eval_every: 0}", "training.eval_every: must be in (0, 1]"),
        ("retrain: {epochs: 0}", "retrain.epochs: must be >= 1"),
        ("retrain: {variants: []}", "retrain.variants: give at least one"),
    ],
)
def test_inconsistent_values_are_errors_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        load_job_spec(write(tmp_path, f"data: x.yaml\n{text}\n"))


def test_missing_file_and_broken_yaml_are_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such job spec"):
        load_job_spec(tmp_path / "absent.yaml")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job_spec(write(tmp_path, "data: [unclosed\n"))
