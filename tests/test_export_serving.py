"""The serving module scripts, exports, survives save/load in a fresh process, and plugs into
torchrec's inference quantization."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_export import make_dlrm, make_kjt, make_mec, one_hot_kjt, tables
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.inference.modules import quantize_inference_model
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from mec_torchrec.export import (
    MEC_QUANT_MAPPING,
    MECInferenceEmbeddingBagCollection,
    export_model,
    export_program,
    load_ops,
    script_model,
)
from mec_torchrec.export.quant import from_mec_module
from mec_torchrec.modules import MECEmbeddingBagCollection
from mec_torchrec.modules import fused as modules_fused

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[(True, "fp32"), (False, "fp32"), (True, "int8"), (False, "int8")],
                ids=["fused", "per_table", "fused-int8", "per_table-int8"])
def serving(tmp_path: Path, request: pytest.FixtureRequest) -> MECInferenceEmbeddingBagCollection:
    fused, weight_dtype = request.param
    export_model(make_mec(), tmp_path / "art", weight_dtype=weight_dtype)
    return MECInferenceEmbeddingBagCollection.load(tmp_path / "art", fused=fused)


def test_scripted_module_equals_eager(serving: MECInferenceEmbeddingBagCollection) -> None:
    scripted = script_model(serving)
    one_hot = KeyedJaggedTensor(keys=["a", "b", "c", "d", "e"],
                                values=torch.tensor([9, 1, 2, 3, 4]),
                                lengths=torch.ones(5, dtype=torch.int64))
    jagged = [make_kjt(tables(), batch=b, seed=b, keys=["d", "a", "e", "c", "b"]) for b in (1, 7)]
    for kjt in (one_hot, *jagged):
        out = scripted(kjt)
        assert out.keys() == ["a", "b", "c", "d", "e"]
        torch.testing.assert_close(out.values(), serving(kjt).values(), atol=0, rtol=0)


def test_exported_program_serves_other_batch_sizes(
    serving: MECInferenceEmbeddingBagCollection,
) -> None:
    program = export_program(serving, (make_kjt(tables(), batch=4, seed=3),))
    # Exported programs pool int8 tables with FBGEMM's byte row-wise kernel, eager mode with the
    # C++ kernels: the same sums up to float rounding. Float tables: bit for bit.
    atol = 1e-6 if holds_int8(serving) else 0.0
    for batch, seed in ((1, 4), (33, 5)):
        kjt = make_kjt(tables(), batch=batch, seed=seed)
        torch.testing.assert_close(program.module()(kjt).values(), serving(kjt).values(),
                                   atol=atol, rtol=0)
    bad = KeyedJaggedTensor(keys=["a", "b", "c", "d", "e"], values=torch.tensor([1, 7, 2, 3, 4]),
                            lengths=torch.ones(5, dtype=torch.int64))
    with pytest.raises(Exception, match=r"table 't_b': id 7 out of range \[0, 7\) in feature 'b'"):
        program.module()(bad)


def holds_int8(serving: MECInferenceEmbeddingBagCollection) -> bool:
    """Whether the module serves int8 row-wise tables (uint8 buffers other than codes)."""
    return any(b.dtype == torch.uint8 and "codes" not in name for name, b in serving.named_buffers())


FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    import torch
    import mec_torchrec.export  # registers torch.ops.mec_torchrec and torch.ops.mec_lookup
    requests = torch.load(sys.argv[1], weights_only=False)
    scripted = torch.jit.load(sys.argv[2])
    program = torch.export.load(sys.argv[3])
    atol = float(sys.argv[4])  # exported programs pool int8 tables with FBGEMM's kernel
    for name, model in (("jit", scripted), ("export", program.module())):
        for dense, kjt, expected in requests:
            out = model(dense, kjt)
            tolerance = atol if name == "export" else 0.0
            assert torch.allclose(out, expected, atol=tolerance, rtol=0), (
                name, (out - expected).abs().max())
    print("ok")
    """
)


@pytest.mark.parametrize("weight_dtype", ["fp32", "int8"])
def test_dlrm_with_serving_module_saved_and_run_in_a_fresh_process(tmp_path: Path,
                                                                   weight_dtype: str) -> None:
    export_model(make_mec(), tmp_path / "art", weight_dtype=weight_dtype)
    dlrm = make_dlrm(MECInferenceEmbeddingBagCollection.load(tmp_path / "art")).eval()
    dense, kjt = torch.randn(5, 3), make_kjt(tables(), batch=5, seed=6)
    with torch.no_grad():
        scripted = script_model(dlrm)
        torch.jit.save(scripted, tmp_path / "dlrm.jit.pt")
        torch.export.save(export_program(dlrm, (dense, kjt)), tmp_path / "dlrm.pt2")
        requests = [(x, k, dlrm(x, k)) for x, k in ((dense, kjt),
                                                    (torch.randn(4, 3), one_hot_kjt(tables(), 4, 6)))]
    if modules_fused.loaded():  # the saved graph calls the C++ kernels
        assert all(name in str(scripted.inlined_graph) for name in KERNELS)
    torch.save(requests, tmp_path / "inputs.pt")
    script = tmp_path / "serve.py"
    script.write_text(FRESH_PROCESS)
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "inputs.pt"), str(tmp_path / "dlrm.jit.pt"),
         str(tmp_path / "dlrm.pt2"), "1e-6" if weight_dtype == "int8" else "0"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "ok"


@pytest.mark.parametrize(
    ("dtype", "codebook_dtype"),
    [(torch.qint8, "int8"), (torch.float16, "fp16"), (torch.float32, "fp32")],
)
def test_quantize_inference_model_swaps_in_the_serving_module(dtype: torch.dtype,
                                                              codebook_dtype: str) -> None:
    mec = make_mec()
    dlrm = make_dlrm(mec)
    kjt = make_kjt(tables(), batch=6, seed=7)
    quantized = quantize_inference_model(copy.deepcopy(dlrm), quantization_mapping=MEC_QUANT_MAPPING,
                                         quantization_dtype=dtype)
    module = quantized.sparse_arch.embedding_bag_collection
    assert isinstance(module, MECInferenceEmbeddingBagCollection)
    out, ref = module(kjt).values(), mec(kjt).values().detach()
    # Children convert first: torchrec stores every inner table (codebooks and full tables) as
    # int8 rows, then the codebooks are stored as MEC int8: half a step each, <= 3 ids per bag.
    step = max(float((b.weight.amax(1) - b.weight.amin(1)).max()) / 255
               for b in mec.codebooks.embedding_bags.values())
    atol = {"int8": 3 * step + 1e-4, "fp16": 1e-3 * float(ref.abs().max()), "fp32": 1e-6}
    torch.testing.assert_close(out, ref, atol=atol[codebook_dtype], rtol=0)
    # int8 keeps the full tables int8 in memory, as torchrec's quantized EBC does.
    packed = getattr(module, "fused_packed", None)
    assert (packed is not None and packed.dtype == torch.uint8) == (codebook_dtype == "int8")


def test_conversion_reads_an_inner_ebc_torchrec_already_quantized() -> None:
    mec = make_mec()
    reference = from_mec_module(mec, "fp32")
    mec.codebooks.qconfig = torch.ao.quantization.QConfig(
        activation=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.float),
        weight=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.float16),
    )
    mec.codebooks = QuantEmbeddingBagCollection.from_float(mec.codebooks)
    converted = from_mec_module(mec, "fp32")
    kjt = make_kjt(tables(), batch=8, seed=8)
    ref = reference(kjt).values()
    torch.testing.assert_close(converted(kjt).values(), ref,
                               atol=1e-3 * float(ref.abs().max()), rtol=0)


def kernels_run(forward: Callable[[KeyedJaggedTensor], object], kjt: KeyedJaggedTensor) -> set[str]:
    """The ``torch.ops.mec_lookup`` operators that one call of ``forward`` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        forward(kjt)
    return {e.name for e in profile.events() if e.name.startswith("mec_lookup::")}


KERNELS = {"mec_lookup::ids_in_range", "mec_lookup::serve_one_hot"}


def without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the serving module see the lookup extension as not loaded (as where it cannot build)."""
    monkeypatch.setattr(modules_fused, "loaded", lambda: False)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_ids_in_range_accepts_exactly_the_valid_batches(dtype: torch.dtype) -> None:
    assert load_ops()
    sizes = torch.tensor([5, 3])  # F = 2, B = 2

    def valid(ids: list, lengths: list[int]) -> bool:
        return torch.ops.mec_lookup.ids_in_range(
            torch.tensor(ids, dtype=dtype if isinstance(ids[0], int) else torch.float32),
            torch.tensor(lengths, dtype=dtype), sizes)

    assert valid([4, 0, 2, 2], [2, 0, 1, 1])
    assert not valid([5, 0, 2, 2], [2, 0, 1, 1])  # feature 0 has 5 rows
    assert not valid([4, 0, 2, 3], [2, 0, 1, 1])  # feature 1 has 3 rows
    assert not valid([4, -1, 2, 2], [2, 0, 1, 1])
    assert not valid([4, 0, 2, 2], [3, -1, 1, 1])  # sums right, one length negative
    assert not valid([4, 0, 2, 2], [2, 0, 1, 2])  # lengths sum to 5, 4 ids
    assert not valid([4.0, 0.0, 2.0, 2.0], [2, 0, 1, 1])
    assert not valid([4, 0, 2], [1, 1, 1])  # 3 lengths for 2 features


def test_scripted_module_calls_the_compiled_kernels(tmp_path: Path) -> None:
    export_model(make_mec(), tmp_path / "art")
    serving = MECInferenceEmbeddingBagCollection.load(tmp_path / "art")
    assert load_ops()
    scripted = script_model(serving)
    kjt = one_hot_kjt(serving.embedding_bag_configs(), batch=3, seed=0)
    assert all(name in str(scripted.inlined_graph) for name in KERNELS)
    assert kernels_run(scripted, kjt) == KERNELS
    assert kernels_run(serving, kjt) == KERNELS


def test_without_the_extension_the_aten_ops_serve(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    export_model(make_mec(), tmp_path / "art")
    serving = MECInferenceEmbeddingBagCollection.load(tmp_path / "art")
    kjt = one_hot_kjt(serving.embedding_bag_configs(), batch=3, seed=0)
    compiled = serving(kjt).values()
    without_the_extension(monkeypatch)
    scripted = script_model(serving)
    assert "mec_lookup::" not in str(scripted.inlined_graph)
    assert kernels_run(scripted, kjt) == kernels_run(serving, kjt) == set()
    torch.testing.assert_close(scripted(kjt).values(), compiled, atol=0, rtol=0)
    bad = KeyedJaggedTensor(keys=["a", "b", "c", "d", "e"], values=torch.tensor([1, 7, 2, 3, 4]),
                            lengths=torch.ones(5, dtype=torch.int64))
    with pytest.raises(Exception, match=r"table 't_b': id 7 out of range \[0, 7\) in feature 'b'"):
        scripted(bad)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("codebook_size", [16, 300], ids=["uint8", "int16"])
def test_compiled_one_id_lookup_equals_the_aten_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weighted: bool, codebook_size: int
) -> None:
    """The compiled kernels (eager and scripted) match the ATen ops (eager and scripted, where
    the extension is unavailable) bit for bit, for uint8 and int16 codes, with and without
    weights."""
    from test_export import COMPRESSION

    from mec_torchrec.modules import MECTableConfig

    compression = {**COMPRESSION, "t_a": MECTableConfig(4, codebook_size)}
    if weighted:
        mec = make_mec(weighted=True)
    else:
        torch.manual_seed(0)
        mec = MECEmbeddingBagCollection(tables(), compression)
    export_model(mec, tmp_path / "art")
    serving = MECInferenceEmbeddingBagCollection.load(tmp_path / "art")
    assert serving.fused and load_ops()
    requests = [one_hot_kjt(serving.embedding_bag_configs(), batch, batch, weighted)
                for batch in (1, 5, 130)]
    scripted = script_model(serving)
    compiled = [(serving(kjt).values(), scripted(kjt).values()) for kjt in requests]
    with monkeypatch.context() as m:
        without_the_extension(m)
        scripted_aten = script_model(serving)
        aten = [(serving(kjt).values(), scripted_aten(kjt).values()) for kjt in requests]
    for kjt, outputs, references in zip(requests, compiled, aten):
        for out in (*outputs, references[1]):
            torch.testing.assert_close(out, references[0], atol=0, rtol=0)
        torch.testing.assert_close(outputs[0], mec(kjt).values(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize(
    ("bags", "weight_dtype"),
    [("one_id", "int8"), ("pooled", "fp32"), ("pooled", "int8")],
)
def test_compiled_lookups_equal_the_aten_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weighted: bool, bags: str, weight_dtype: str
) -> None:
    """One id per bag with int8 full tables: ``serve_one_hot`` dequantizes their rows in place of
    the float slots. Bags of 0-3 ids (SUM and MEAN tables, empty bags): one call of
    ``serve_pooled`` (the training module's pooling loops over the stacked buffers; int8 rows
    dequantized in the loop). Eager == scripted; both equal the ATen ops (FBGEMM's kernel for
    int8 rows) up to float rounding."""
    mec = make_mec(weighted=weighted)
    export_model(mec, tmp_path / "art", weight_dtype=weight_dtype)
    serving = MECInferenceEmbeddingBagCollection.load(tmp_path / "art")
    assert serving.fused and load_ops()
    configs = serving.embedding_bag_configs()
    if bags == "one_id":
        requests = [one_hot_kjt(configs, batch, batch, weighted) for batch in (1, 5, 130)]
        kernels = KERNELS
    else:
        requests = [make_kjt(configs, batch=b, seed=b, weighted=weighted) for b in (1, 7, 130)]
        kernels = {"mec_lookup::ids_in_range", "mec_lookup::serve_pooled"}
    scripted = script_model(serving)
    assert kernels_run(scripted, requests[1]) == kernels
    compiled = [(serving(kjt).values(), scripted(kjt).values()) for kjt in requests]
    with monkeypatch.context() as m:
        without_the_extension(m)
        aten = [serving(kjt).values() for kjt in requests]
    for (eager, script), reference in zip(compiled, aten):
        torch.testing.assert_close(script, eager, atol=0, rtol=0)
        torch.testing.assert_close(eager, reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dim", [64, 128])
def test_compiled_pooled_lookup_at_the_simd_widths(monkeypatch: pytest.MonkeyPatch,
                                                   dim: int) -> None:
    """D = 64 and 128 with L = 4 take the kernels specialised per subspace width (16, 32 floats)
    and per full-table width; they equal the ATen ops too."""
    from torchrec.modules.embedding_configs import PoolingType

    from mec_torchrec.export.format import encode_weight

    g = torch.Generator().manual_seed(dim)
    configs = [
        EmbeddingBagConfig(name="t_a", num_embeddings=300, embedding_dim=dim, feature_names=["a"]),
        EmbeddingBagConfig(name="t_b", num_embeddings=40, embedding_dim=dim, feature_names=["b"],
                           pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t_c", num_embeddings=60, embedding_dim=dim, feature_names=["c"]),
    ]
    compressed = {"t_a": (torch.randint(0, 256, (300, 4), generator=g, dtype=torch.uint8),
                          torch.randn(4, 256, dim // 4, generator=g))}
    full = {"t_b": torch.randn(40, dim, generator=g),
            "t_c": encode_weight(torch.randn(60, dim, generator=g), "int8")}
    serving = MECInferenceEmbeddingBagCollection(configs, compressed, full)
    assert load_ops()
    kjt = make_kjt(configs, batch=300, seed=dim)
    compiled = serving(kjt).values()
    assert kernels_run(serving, kjt) == {"mec_lookup::ids_in_range", "mec_lookup::serve_pooled"}
    without_the_extension(monkeypatch)
    torch.testing.assert_close(compiled, serving(kjt).values(), atol=1e-5, rtol=1e-6)
