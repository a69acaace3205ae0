"""CompressedTable: layout, memory accounting, validation and bit-exact persistence."""

import pytest
import torch

from mec_torchrec.quantize import CompressedTable, code_dtype


def _table(n: int = 10, num_subspaces: int = 2, k: int = 4, sub_dim: int = 3) -> CompressedTable:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, k, (n, num_subspaces), generator=g)
    return CompressedTable(codes, torch.randn(num_subspaces, k, sub_dim, generator=g), {"mse": 0.5})


def test_decode_concatenates_codebook_entries():
    codes = torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8)
    codebooks = torch.arange(8, dtype=torch.float32).reshape(2, 2, 2)
    table = CompressedTable(codes, codebooks)
    assert torch.equal(table.decode(), torch.tensor([[0.0, 1.0, 6.0, 7.0], [2.0, 3.0, 4.0, 5.0]]))
    assert torch.equal(table.decode(torch.tensor([1])), table.decode()[1:])
    assert (table.num_rows, table.dim, table.num_subspaces, table.codebook_size) == (2, 4, 2, 2)


@pytest.mark.parametrize(
    ("k", "dtype"),
    [
        (2, torch.uint8),
        (256, torch.uint8),
        (257, torch.int16),
        (32768, torch.int16),
        (32769, torch.int32),
    ],
)
def test_codes_use_smallest_dtype(k, dtype):
    assert code_dtype(k) == dtype
    table = CompressedTable(torch.zeros(3, 1, dtype=torch.long), torch.zeros(1, k, 1))
    assert table.codes.dtype == dtype


def test_nbytes_counts_codes_and_codebooks():
    table = _table(n=1000, num_subspaces=4, k=256, sub_dim=16)
    assert table.nbytes == 1000 * 4 * 1 + 4 * 256 * 16 * 4
    assert table.full_nbytes == 1000 * 64 * 4
    assert table.compression_ratio == pytest.approx(table.full_nbytes / table.nbytes)


def test_save_load_is_bit_exact(tmp_path):
    table = _table()
    table.save(tmp_path / "t.safetensors")
    loaded = CompressedTable.load(tmp_path / "t.safetensors")
    assert loaded.codes.dtype == table.codes.dtype
    assert torch.equal(loaded.codes, table.codes)
    assert torch.equal(loaded.codebooks.view(torch.int32), table.codebooks.view(torch.int32))
    assert loaded.stats == table.stats
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def test_save_failure_leaves_previous_file(tmp_path):
    path = tmp_path / "t.safetensors"
    _table().save(path)
    before = path.read_bytes()
    bad = _table()
    bad.stats = {"not_json": object()}
    with pytest.raises(TypeError):
        bad.save(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("codes", "codebooks", "match"),
    [
        (torch.tensor([[0, 4]]), torch.zeros(2, 4, 1), r"out of range \[0, 4\): min 0, max 4"),
        (torch.tensor([[-1, 0]]), torch.zeros(2, 4, 1), "out of range"),
        (torch.tensor([[0, 0, 0]]), torch.zeros(2, 4, 1), "codes have 3 subspaces"),
        (torch.tensor([[0.0, 1.0]]), torch.zeros(2, 4, 1), "integer"),
        (torch.tensor([0, 1]), torch.zeros(2, 4, 1), "2-D"),
        (torch.tensor([[0, 1]]), torch.zeros(2, 4), "3-D"),
        (torch.tensor([[0, 1]]), torch.full((2, 4, 1), float("nan")), "NaN"),
    ],
)
def test_constructor_rejects_bad_input(codes, codebooks, match):
    with pytest.raises(ValueError, match=match):
        CompressedTable(codes, codebooks)


def test_load_rejects_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a CompressedTable"):
        CompressedTable.load(tmp_path / "x.safetensors")
