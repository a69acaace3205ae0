"""The serving module scripts, exports, survives save/load in a fresh process, and plugs into
torchrec's inference quantization."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_export import make_dlrm, make_kjt, make_mec, tables
from torchrec import KeyedJaggedTensor
from torchrec.inference.modules import quantize_inference_model
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from mec_torchrec.export import (
    MEC_QUANT_MAPPING,
    MECInferenceEmbeddingBagCollection,
    export_model,
    export_program,
    script_model,
)
from mec_torchrec.export.quant import from_mec_module
from mec_torchrec.modules import MECEmbeddingBagCollection

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[True, False], ids=["fused", "per_table"])
def serving(tmp_path: Path, request: pytest.FixtureRequest) -> MECInferenceEmbeddingBagCollection:
    export_model(make_mec(), tmp_path / "art")
    return MECInferenceEmbeddingBagCollection.load(tmp_path / "art", fused=request.param)


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
    for batch, seed in ((1, 4), (33, 5)):
        kjt = make_kjt(tables(), batch=batch, seed=seed)
        torch.testing.assert_close(program.module()(kjt).values(), serving(kjt).values(),
                                   atol=0, rtol=0)
    bad = KeyedJaggedTensor(keys=["a", "b", "c", "d", "e"], values=torch.tensor([1, 7, 2, 3, 4]),
                            lengths=torch.ones(5, dtype=torch.int64))
    with pytest.raises(Exception, match=r"table 't_b': id 7 out of range \[0, 7\) in feature 'b'"):
        program.module()(bad)


FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    import torch
    import mec_torchrec.export  # registers torch.ops.mec_torchrec.checked_ids
    inputs = torch.load(sys.argv[1], weights_only=False)
    scripted = torch.jit.load(sys.argv[2])
    program = torch.export.load(sys.argv[3])
    for name, model in (("jit", scripted), ("export", program.module())):
        out = model(inputs["dense"], inputs["kjt"])
        assert torch.equal(out, inputs["expected"]), (name, (out - inputs["expected"]).abs().max())
    print("ok")
    """
)


def test_dlrm_with_serving_module_saved_and_run_in_a_fresh_process(tmp_path: Path) -> None:
    export_model(make_mec(), tmp_path / "art")
    dlrm = make_dlrm(MECInferenceEmbeddingBagCollection.load(tmp_path / "art")).eval()
    dense, kjt = torch.randn(5, 3), make_kjt(tables(), batch=5, seed=6)
    with torch.no_grad():
        expected = dlrm(dense, kjt)
        torch.jit.save(script_model(dlrm), tmp_path / "dlrm.jit.pt")
        torch.export.save(export_program(dlrm, (dense, kjt)), tmp_path / "dlrm.pt2")
    torch.save({"dense": dense, "kjt": kjt, "expected": expected}, tmp_path / "inputs.pt")
    script = tmp_path / "serve.py"
    script.write_text(FRESH_PROCESS)
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "inputs.pt"), str(tmp_path / "dlrm.jit.pt"),
         str(tmp_path / "dlrm.pt2")],
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


def _spy(kernel, calls: list[bool]):
    def spy(values: torch.Tensor, weight: torch.Tensor):
        calls.append(True)
        return kernel(values, weight)

    return spy


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("codebook_size", [16, 300], ids=["uint8", "int16"])
def test_compiled_one_id_lookup_equals_the_aten_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weighted: bool, codebook_size: int
) -> None:
    """Eager one-id-per-bag requests take the compiled kernel; it must match the ATen ops
    (what TorchScript runs) bit for bit, for uint8 and int16 codes, with and without weights."""
    from test_export import COMPRESSION

    from mec_torchrec.export import fused as fused_lookup
    from mec_torchrec.modules import MECTableConfig

    compression = {**COMPRESSION, "t_a": MECTableConfig(4, codebook_size)}
    if weighted:
        mec = make_mec(weighted=True)
    else:
        torch.manual_seed(0)
        mec = MECEmbeddingBagCollection(tables(), compression)
    export_model(mec, tmp_path / "art")
    serving = MECInferenceEmbeddingBagCollection.load(tmp_path / "art")
    assert serving.fused and fused_lookup.cpu_kernel(torch.zeros(1), serving.fused_weight)
    configs = serving.embedding_bag_configs()
    keys = [f for t in configs for f in t.feature_names]
    g = torch.Generator().manual_seed(7)
    for batch in (1, 5, 130):
        values = torch.cat([torch.randint(0, t.num_embeddings, (batch,), generator=g)
                            for t in configs for _ in t.feature_names])
        kjt = KeyedJaggedTensor(keys=keys, values=values,
                                lengths=torch.ones(len(keys) * batch, dtype=torch.int64),
                                weights=torch.rand(values.numel(), generator=g) if weighted
                                else None)
        calls: list[bool] = []
        with monkeypatch.context() as m:
            m.setattr(fused_lookup, "cpu_kernel", _spy(fused_lookup.cpu_kernel, calls))
            compiled = serving(kjt).values()
        assert calls  # the compiled path served it
        with monkeypatch.context() as m:
            m.setattr(fused_lookup, "cpu_kernel", lambda values, weight: None)
            reference = serving(kjt).values()
        torch.testing.assert_close(compiled, reference, atol=0, rtol=0)
        torch.testing.assert_close(compiled, mec(kjt).values(), atol=1e-5, rtol=1e-5)
