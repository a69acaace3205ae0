"""MECInferenceEmbeddingBagCollection: serves an exported artifact, buffers only."""

import json
import os
from pathlib import Path

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from mec_torchrec.export import fused as fused_lookup
from mec_torchrec.export import kernels, ops
from mec_torchrec.export.format import ROWWISE_EXTRA_BYTES, Manifest, decode_codebooks
from mec_torchrec.export.reader import read_manifest, read_table


class MECInferenceEmbeddingBagCollection(nn.Module):
    """The serving twin of ``MECEmbeddingBagCollection``: same input, same output, no parameters.

    It is called with a ``KeyedJaggedTensor`` of values shaped ``(F, B, L[f][i])`` (any key
    order; extra keys are ignored) and returns a ``KeyedTensor`` [B, sum of dims] with the keys,
    order and layout of an ``EmbeddingBagCollection`` of the same configs:
    ``KT[i] = cat([pool_f(rows of J[f][i]) for f in features])`` (SUM, or MEAN = SUM / bag length;
    input weights multiply rows when the artifact is weighted).

    Codebooks are decoded once to float32 at load (from fp32, fp16 or int8 storage; they are
    small, so the hot path never dequantizes them). Full tables stored int8 row-wise stay int8
    in memory and are dequantized while pooled (by the C++ kernels on CPU, else by FBGEMM's byte
    row-wise kernel, ``torch.ops.quantized.embedding_bag_byte_rowwise_offsets``). Two layouts of
    the buffers:

    * fused (default when all tables share D and compressed tables share L, as in DLRM):
      ``fused_codes`` [sum N, L] (all codes stacked), ``fused_weight`` [R, D / L] (all codebooks
      and the full float tables cut into L chunks per row; int8 ones stacked apart in
      ``fused_packed``); a request is one codes gather, one scatter and one ``embedding_bag``
      (plus one byte row-wise call for int8 tables), whatever the number of tables (see
      ``fused.py``).
    * per table (``fused=False``): ``codes.<table>`` [N, L], ``codebooks.<table>`` [L * K, D / L],
      ``weights.<table>`` [N, D]; on CPU codes and full tables stay views of the mapped blobs
      (zero-copy, page cache shared across processes), at one lookup per table.

    The forward is an id check and the pooled lookup, in plain ATen ops plus one custom op
    (``torch.ops.mec_torchrec.checked_ids``, called for out-of-range ids and inside exported
    programs), so the module fx-traces with ``torchrec.fx.symbolic_trace``, scripts with
    ``torch.jit.script`` and exports with ``torch.export.export``. On CPU, eager and scripted,
    the id bounds check and the fused layout's lookup (one id per bag, or any bags) run C++
    kernels instead (``torch.ops.mec_lookup``, see ``kernels``) when the lookup extension is
    available.

    Args:
        tables: the outer table configs, in output order.
        compressed: per compressed table ``(codes [N, L], codebooks [L, K, D / L] float)``.
        full: per full table its weight: float [N, D], or int8 row-wise uint8 [N, D + 8] (D bytes
            then float32 scale and bias, ``torch.ops.quantized.embedding_bag_byte_prepack``'s
            layout), which is served in that form.
        is_weighted: whether input weights multiply rows.
        unknown_id_policy: ``"error"`` (default) raises ``ValueError`` naming table, id, range and
            feature for an id outside [0, N); ``"reserved"`` serves such an id as row N - 1, the
            OOV row the data layer reserves. Never silently row 0.
        fused: the buffer layout (None: fused when possible; see above).

    Example::

        serving = MECInferenceEmbeddingBagCollection.load("out/serving")
        kjt = KeyedJaggedTensor(keys=["C1", "C2"], values=torch.tensor([3, 7, 1]),
                                lengths=torch.tensor([2, 0, 1, 0]))   # B = 2
        serving(kjt).to_dict()["C1"]                                     # [2, D]
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        compressed: dict[str, tuple[torch.Tensor, torch.Tensor]],
        full: dict[str, torch.Tensor],
        is_weighted: bool = False,
        unknown_id_policy: str = "error",
        fused: bool | None = None,
    ) -> None:
        super().__init__()
        if unknown_id_policy not in ops.OUT_OF_RANGE:
            raise ValueError(
                f"unknown_id_policy must be one of {ops.OUT_OF_RANGE}, got {unknown_id_policy!r}"
            )
        self._configs = list(tables)
        self._is_weighted = is_weighted
        self._reserved = unknown_id_policy == "reserved"
        self._features = [f for t in tables for f in t.feature_names]
        self._feature_dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        self._table_num_features = [len(t.feature_names) for t in tables]
        self._table_dims = [t.embedding_dim for t in tables]
        self._table_is_mean = [t.pooling == PoolingType.MEAN for t in tables]
        self._names = json.dumps([[f, t.name] for t in tables for f in t.feature_names])
        self._table_slot: list[int] = []
        self._compressed_names: list[str] = []
        self._full_names: list[str] = []
        per_table = [_checked_table(t, compressed, full) for t in tables]
        subspaces = [pair[1].shape[0] for pair, _ in per_table if pair is not None]
        can = fused_lookup.can_fuse(self._table_dims, subspaces)
        if fused and not can:
            raise ValueError("fused=True needs one dim for all tables and one L for compressed ones")
        self._fused = can if fused is None else fused
        if self._fused:
            plan = fused_lookup.build(
                self._table_num_features,
                [pair for pair, _ in per_table],
                [weight for _, weight in per_table],
                self._table_is_mean,
                subspaces[0] if subspaces else 1,
            )
            self._num_slots = plan.num_slots
            self._has_mean = any(self._table_is_mean)
            self._has_packed = plan.packed is not None
            names = ["weight", "codes", "feature_plan", "feature_is_mean"]
            if self._has_packed:
                names += ["packed", "packed_plan"]
            for name in names:
                self.register_buffer(f"fused_{name}", getattr(plan, name))
        else:
            self._has_packed = False
            self.codes = nn.Module()
            self.codebooks = nn.Module()
            self.code_bases = nn.Module()
            self.weights = nn.Module()
            for config, (pair, weight) in zip(tables, per_table):
                if pair is not None:
                    codes, codebooks = pair
                    num_subspaces, k, sub_dim = codebooks.shape
                    self._table_slot.append(len(self._compressed_names))
                    self._compressed_names.append(config.name)
                    self.codes.register_buffer(config.name, codes)
                    flat = codebooks.float().reshape(num_subspaces * k, sub_dim).contiguous()
                    self.codebooks.register_buffer(config.name, flat)
                    bases = torch.arange(num_subspaces, device=flat.device) * k
                    self.code_bases.register_buffer(config.name, bases)
                else:
                    assert weight is not None
                    self._table_slot.append(-1 - len(self._full_names))
                    self._full_names.append(config.name)
                    # int8 row-wise tables stay uint8 [N, D + 8] (ops.pooled_lookup pools them).
                    stored = weight if weight.dtype == torch.uint8 else weight.float()
                    self.weights.register_buffer(config.name, stored)
        device = next(iter(self.buffers())).device if list(self.buffers()) else None
        self.register_buffer(
            "feature_sizes",
            torch.tensor(
                [t.num_embeddings for t in tables for _ in t.feature_names],
                dtype=torch.int64,
                device=device,
            ),
        )
        if self.feature_sizes.device.type == "cpu":
            kernels.load_ops()  # build or load the compiled kernels now, not on the first request

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: torch.device | str = "cpu",
        verify: bool = True,
        unknown_id_policy: str | None = None,
        fused: bool | None = None,
    ) -> "MECInferenceEmbeddingBagCollection":
        """Serve the artifact folder ``path`` (written by ``export_model``).

        The manifest is checked against its own ``manifest_sha256`` first (always: it is small).
        Blobs are memory-mapped (on CPU codes and full tables stay views of the files); each is
        checked against the manifest: presence, size, sha256 (skipped with ``verify=False``, for
        a fast start from a trusted disk), tensor names, dtypes and shapes, code range.

        Args:
            path: the artifact folder.
            device: where the buffers live (non-CPU devices copy them there).
            verify: check every blob's sha256 (reads every byte once).
            unknown_id_policy: overrides the policy the artifact was exported with.
            fused: serve all tables with one stacked lookup (default when all tables share a
                dim and compressed ones an L; copies codes and tables once into stacked
                buffers) or, with ``False``, one lookup per table straight from the mapped
                blobs (zero-copy: the page cache is shared by every process serving them).

        Raises:
            ArtifactError: the artifact is incomplete, corrupt, of an unknown format version or
                inconsistent with its manifest (the message names the file and the mismatch).
        """
        root = Path(path)
        manifest = read_manifest(root)
        compressed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        full: dict[str, torch.Tensor] = {}
        for table in manifest.tables:
            tensors = read_table(root, table, verify, device)
            if table.compressed:
                compressed[table.name] = (tensors["codes"], decode_codebooks(tensors))
            else:
                full[table.name] = tensors["weight"]  # float32, or int8 row-wise uint8 as stored
        return cls(
            configs_of(manifest),
            compressed,
            full,
            is_weighted=manifest.is_weighted,
            unknown_id_policy=unknown_id_policy or manifest.unknown_id_policy,
            fused=fused,
        )

    @classmethod
    def from_float(
        cls, module: nn.Module, use_precomputed_fake_quant: bool = False
    ) -> "MECInferenceEmbeddingBagCollection":
        """TorchRec/torch.ao quantization hook: a ``MECEmbeddingBagCollection`` -> serving module.

        Called by ``quantize_inference_model`` with ``MEC_QUANT_MAPPING`` (the codebook dtype
        follows ``module.qconfig``; see ``mec_torchrec.export.quant``).
        """
        from mec_torchrec.export.quant import from_mec_module

        return from_mec_module(module)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The outer table configs, in output order."""
        return self._configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of ``features`` in EBC layout (see the class docstring)."""
        ordered = ops.in_feature_order(features, self._features)
        lengths = ordered.lengths()
        # The C++ kernels or the ATen ops, picked here in Python: fx tracing records the pick, so
        # a TorchScript graph calls the kernels as eager mode does (see ``kernels``).
        compiled = kernels.serves(self.feature_sizes)
        check = ops.compiled_check_ids if compiled else ops.check_ids
        values = check(ordered.values(), lengths, self.feature_sizes, self._names, self._reserved)
        weights = ops.required_weights(ordered) if self._is_weighted else None
        if self._fused:
            lookup = (
                fused_lookup.compiled_pooled_lookup
                if compiled and self.fused_weight.dtype == torch.float32
                else fused_lookup.fused_pooled_lookup
            )
            pooled = lookup(
                values,
                lengths,
                weights,
                ordered.stride(),
                self.fused_weight,
                self.fused_codes,
                self.fused_feature_plan,
                self.fused_feature_is_mean,
                self._num_slots,
                self._has_mean,
                self.fused_packed if self._has_packed else None,
                self.fused_packed_plan if self._has_packed else None,
            )
        else:
            pooled = ops.pooled_lookup(
                values,
                lengths,
                weights,
                ordered.stride(),
                self._table_num_features,
                self._table_dims,
                self._table_is_mean,
                self._table_slot,
                [getattr(self.codes, n) for n in self._compressed_names],
                [getattr(self.codebooks, n) for n in self._compressed_names],
                [getattr(self.code_bases, n) for n in self._compressed_names],
                [getattr(self.weights, n) for n in self._full_names],
            )
        return KeyedTensor(keys=self._features, length_per_key=self._feature_dims, values=pooled)

    @property
    def fused(self) -> bool:
        """Whether all tables are served by one stacked lookup (else one lookup per table)."""
        return self._fused

    def embedding_bytes(self) -> int:
        """Bytes of the tensors held (codes, codebooks, full tables; index plans excluded)."""
        if self._fused:
            held = [self.fused_weight, self.fused_codes]
            if self._has_packed:
                held.append(self.fused_packed)
        else:
            held = [*self.codes.buffers(), *self.codebooks.buffers(), *self.weights.buffers()]
        return sum(x.numel() * x.element_size() for x in held)


def _checked_table(
    config: EmbeddingBagConfig,
    compressed: dict[str, tuple[torch.Tensor, torch.Tensor]],
    full: dict[str, torch.Tensor],
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """(codes, codebooks) or the full weight of one table, shapes checked against its config."""
    if config.name in compressed:
        codes, codebooks = compressed[config.name]
        num_subspaces, _, sub_dim = codebooks.shape
        if tuple(codes.shape) != (config.num_embeddings, num_subspaces):
            raise ValueError(
                f"table {config.name!r}: codes {tuple(codes.shape)}, expected "
                f"({config.num_embeddings}, {num_subspaces})"
            )
        if num_subspaces * sub_dim != config.embedding_dim:
            raise ValueError(
                f"table {config.name!r}: codebooks {tuple(codebooks.shape)} do not make "
                f"dim {config.embedding_dim}"
            )
        return (codes, codebooks), None
    weight = full[config.name]
    # float [N, D], or int8 row-wise: uint8 [N, D + 8] (D bytes, float32 scale and bias).
    width = config.embedding_dim + (ROWWISE_EXTRA_BYTES if weight.dtype == torch.uint8 else 0)
    if tuple(weight.shape) != (config.num_embeddings, width):
        raise ValueError(
            f"table {config.name!r}: {weight.dtype} weight {tuple(weight.shape)}, expected "
            f"({config.num_embeddings}, {width})"
        )
    return None, weight


def configs_of(manifest: Manifest) -> list[EmbeddingBagConfig]:
    """The outer EmbeddingBagConfigs an artifact's manifest describes."""
    return [
        EmbeddingBagConfig(
            name=t.name,
            num_embeddings=t.num_embeddings,
            embedding_dim=t.embedding_dim,
            feature_names=list(t.feature_names),
            pooling=PoolingType[t.pooling],
        )
        for t in manifest.tables
    ]
