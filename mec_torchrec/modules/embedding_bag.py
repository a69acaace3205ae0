"""MECEmbeddingBagCollection: a drop-in EmbeddingBagCollection whose large tables are MEC codes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from mec_torchrec.modules import fused as _fused
from mec_torchrec.modules import remap as _remap
from mec_torchrec.modules.config import MECTableConfig, TableBytes
from mec_torchrec.modules.layout import build_layout, sub_name
from mec_torchrec.modules.lookup import DenseTableBatchedLookup
from mec_torchrec.quantize.table import CompressedTable, code_dtype

KERNELS = ("auto", "fused", "tbe")

#: ``(ids, ids_per_feature) -> (ids', codes per compressed table)``: see ``remap``.
CodeSource = Callable[[torch.Tensor, list[int]], tuple[torch.Tensor, list[torch.Tensor]]]


class MECEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """An ``EmbeddingBagCollection`` in which some tables are product-quantized (MEC).

    It takes the same ``EmbeddingBagConfig`` list as ``EmbeddingBagCollection`` plus, per table to
    compress, a :class:`MECTableConfig` (L subspaces, K codebook entries). A compressed table of N
    rows and dim D is held as

    * ``codes.<table>``: a persistent, non-trainable buffer [N, L] of integers in [0, K) (uint8 for
      K <= 256), part of ``state_dict``;
    * ``codebooks``: an inner torchrec ``EmbeddingBagCollection`` holding tables ``<table>@l``
      (K rows x D / L, features ``<feature>@l``) for l in 0..L-1, plus every uncompressed table
      unchanged. Codebooks are ordinary trainable parameters.

    Row j of a compressed table is ``cat([codebooks[t@l].weight[codes[j, l]] for l in range(L)])``.

    It is called with a ``KeyedJaggedTensor`` of values shaped ``(F, B, L[f][i])`` (F features, batch
    B, jagged bag lengths) and returns a ``KeyedTensor`` of shape (B, sum of embedding dims) with
    exactly the keys, order and layout an ``EmbeddingBagCollection`` of the same configs returns:
    ``KT[i] = cat([pool_f(rows of J[f][i]) for f in features])``, pooling each bag by the table's
    SUM or MEAN (per-id weights multiply rows when ``is_weighted``). Because the pooling of a
    concatenation is the concatenation of the pooled parts, each bag is pooled per subspace.

    The forward is ``remap`` (ids -> code ids, one KJT key per subspace), one FBGEMM table-batched
    pooled lookup over all codebooks and full tables, and the output in EBC layout. ``remap`` and
    ``regroup`` are public so a sharder can place the inner EBC's all-to-alls between them:
    ``forward(kjt) == regroup(codebooks(remap(kjt)).to_dict())``.

    On CPU the forward by default skips the remap: a fused kernel (``modules/fused.py``) reads
    ``codes[id, l]`` inside the pooling loop, with the same outputs and codebook gradients.

    Args:
        tables: the embedding tables, as for ``EmbeddingBagCollection`` (FP32, SUM or MEAN pooling,
            each feature in one table).
        compression: table name -> MEC settings; other tables stay full.
        device: where codes, codebooks and full tables live (CPU or CUDA).
        unknown_id_policy: ``"error"`` (default) raises ``ValueError`` for an id outside [0, N),
            naming the feature, the id and the table size; ``"reserved"`` serves such an id as row
            N - 1 of its table, the OOV row ``mec_torchrec.data`` reserves for rare values (for a
            compressed table: the code tuple ``codes[N - 1]``). Never silently row 0.
        is_weighted: whether the input KJT's weights multiply the rows (as in the EBC).
        kernel: ``"auto"`` (default): the fused CPU kernel when the module is on CPU and the
            extension builds (else, warned once, the remap + TBE path); ``"fused"``: that kernel
            or ``RuntimeError``; ``"tbe"``: always remap + one dense TBE call.

    Example::

        tables = [
            EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=1000, feature_names=["f1"]),
            EmbeddingBagConfig(name="t2", embedding_dim=3, num_embeddings=10, feature_names=["f2"]),
        ]
        mec = MECEmbeddingBagCollection(tables, {"t1": MECTableConfig(num_subspaces=2, codebook_size=16)})

        #        i = 0     i = 1    i = 2  <-- batch indices
        # "f1"   [0,999]   None      [2]
        # "f2"   [3]       [4]     [5,6,7]
        features = KeyedJaggedTensor(
            keys=["f1", "f2"],
            values=torch.tensor([0, 999, 2, 3, 4, 5, 6, 7]),
            lengths=torch.tensor([2, 0, 1, 1, 1, 3]),
        )
        out = mec(features)          # KeyedTensor, keys ["f1", "f2"], values (3, 7)
        mec.remap(features).keys()   # ["f1@0", "f1@1", "f2"]: code ids of t1, ids of t2
        mec.codes.t1.shape           # (1000, 2), torch.uint8
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        compression: dict[str, MECTableConfig],
        device: torch.device | str | None = None,
        unknown_id_policy: str = "error",
        is_weighted: bool = False,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if unknown_id_policy not in _remap.UNKNOWN_ID_POLICIES:
            raise ValueError(
                f"unknown_id_policy must be one of {_remap.UNKNOWN_ID_POLICIES}, got {unknown_id_policy!r}"
            )
        self._layout = layout = build_layout(tables, compression)
        self._embedding_bag_configs = tables
        self._compression = dict(compression)
        self._is_weighted = is_weighted
        self._unknown_id_policy = unknown_id_policy
        self.codebooks = EmbeddingBagCollection(
            tables=layout.inner_tables, is_weighted=is_weighted, device=device
        )
        self._device: torch.device = self.codebooks.device
        self.codes = nn.Module()
        by_name = {t.name: t for t in tables}
        for name in layout.compressed:
            mec = compression[name]
            # Random codes make a fresh module a usable (randomly hashed) model until real
            # codes are loaded with load_compressed / load_state_dict.
            codes = torch.randint(
                mec.codebook_size,
                (by_name[name].num_embeddings, mec.num_subspaces),
                dtype=code_dtype(mec.codebook_size),
                device=self._device,
            )
            self.codes.register_buffer(name, codes, persistent=True)
        self._lookup = DenseTableBatchedLookup(
            [(t.num_embeddings, t.embedding_dim) for t in layout.inner_tables],
            layout.lookup_tables,
            layout.lookup_is_mean,
        )
        self._kernel = kernel
        self._fused_plan = _fused.build_plan(layout)
        self.register_load_state_dict_post_hook(_check_loaded_codes)

    # -- EmbeddingBagCollectionInterface -------------------------------------------------------

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The outer table configs, as given."""
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        """Whether the input KJT's weights multiply the rows."""
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        """Where codes, codebooks and full tables live."""
        return self._device

    @property
    def unknown_id_policy(self) -> str:
        """What an id outside [0, N) gets: ``"error"`` or ``"reserved"`` (row N - 1)."""
        return self._unknown_id_policy

    @property
    def compression(self) -> dict[str, MECTableConfig]:
        """Table name -> MEC settings of the compressed tables."""
        return dict(self._compression)

    @property
    def kernel(self) -> str:
        """The requested forward kernel: ``"auto"``, ``"fused"`` or ``"tbe"``."""
        return self._kernel

    def uses_fused_kernel(self) -> bool:
        """Whether ``forward`` runs the fused CPU kernel (builds it on first call).

        Decided per call from where the codes and weights are now (a module built on meta or
        moved after construction included); the build is tried once.
        """
        if self._kernel == "tbe":
            return False
        # Read from the modules' own dicts: cheap per call, and real tensors (not proxies) while
        # fx traces the forward.
        weights = [bag._parameters["weight"] for bag in self.codebooks.embedding_bags.values()]
        on_cpu = all(t.is_cpu for t in (*weights, *self.codes._buffers.values()))
        if self._kernel == "fused":
            if not on_cpu:
                raise RuntimeError("kernel='fused' runs on CPU only (use 'auto' or 'tbe')")
            if not _fused.available():
                raise RuntimeError("kernel='fused': the fused lookup extension failed to build")
            return True
        return on_cpu and _fused.available()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of ``features`` in EBC layout (see the class docstring)."""
        if self.uses_fused_kernel():
            values, lengths, weights, stride, _ = self._checked_tensors(features)
            pooled = _fused.fused_pooled_lookup(
                values,
                lengths,
                weights,
                stride,
                [getattr(self.codes, name) for name in self._layout.compressed],
                self._inner_weights(),
                self._fused_plan,
            )
        else:
            values, lengths, weights = self._remap_tensors(features)
            offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
            pooled = self._lookup(self._inner_weights(), values, offsets, lengths, weights)
        return KeyedTensor(
            keys=self._layout.features,
            length_per_key=self._layout.feature_dims,
            values=pooled,
        )

    # -- the two halves, for the sharder -------------------------------------------------------

    def remap(
        self, features: KeyedJaggedTensor, code_source: CodeSource | None = None
    ) -> KeyedJaggedTensor:
        """The KJT the inner ``codebooks`` EBC takes: keys in its feature order.

        A feature ``f`` of a compressed table becomes ``f@0 .. f@{L-1}`` holding the code ids
        ``codes[ids, l]`` (int64) with the lengths (and weights) of ``f``; features of full tables
        pass through. Out-of-range ids raise or follow ``unknown_id_policy``.

        ``code_source(ids, ids_per_feature)`` (checked ids in outer feature order) may replace the
        codes read: it returns ``(ids', codes)``, one tensor per compressed table that ``ids'``
        index instead of ``self.codes``. A sharder passes one that fetches the codes rows of ids
        from the ranks that own them.
        """
        values, lengths, weights = self._remap_tensors(features, code_source)
        remapped = KeyedJaggedTensor(
            keys=self._layout.lookup_features,
            values=values,
            lengths=lengths,
            weights=weights,
            stride=features.stride(),
        )
        if self._layout.lookup_to_inner is not None:
            remapped = remapped.permute(self._layout.lookup_to_inner)
        return remapped

    def regroup(self, pooled: dict[str, torch.Tensor]) -> KeyedTensor:
        """Inner pooled features (``{"f@l": [B, D/L], "g": [B, D_g], ...}``) -> EBC layout.

        ``f`` is the concatenation of ``f@0 .. f@{L-1}``; mean pooling needs nothing more since
        the inner EBC already pooled each part by its table's pooling.
        """
        values = torch.cat([pooled[k] for k in self._layout.lookup_features], dim=1)
        return KeyedTensor(
            keys=self._layout.features,
            length_per_key=self._layout.feature_dims,
            values=values,
        )

    def _checked_tensors(self, features: KeyedJaggedTensor) -> tuple:
        """(ids, lengths, weights or None, stride, length_per_key), outer order, ids checked."""
        layout = self._layout
        # Called through the module so that torch.fx.wrap (which patches remap's globals while
        # tracing) keeps these data-dependent functions as single graph nodes.
        ordered = _remap.in_feature_order(features, layout.features)
        length_per_key = ordered.length_per_key()
        values = _remap.check_ids(
            ordered.values(),
            length_per_key,
            layout.feature_sizes,
            layout.features,
            layout.feature_tables,
            self._unknown_id_policy,
        )
        weights = ordered.weights_or_none() if self._is_weighted else None
        if self._is_weighted and weights is None:
            raise ValueError("input KeyedJaggedTensor has no weights, but is_weighted=True")
        return values, ordered.lengths(), weights, ordered.stride(), length_per_key

    def _remap_tensors(
        self, features: KeyedJaggedTensor, code_source: CodeSource | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        layout = self._layout
        values, lengths, weights, stride, length_per_key = self._checked_tensors(features)
        codes = [getattr(self.codes, name) for name in layout.compressed]
        if code_source is not None:
            values, codes = code_source(values, length_per_key)
        return _remap.remap_values(
            values,
            lengths,
            weights,
            stride,
            length_per_key,
            codes,
            layout.table_codes,
            layout.table_num_features,
            layout.lookup_sources,
        )

    def _inner_weights(self) -> list[torch.Tensor]:
        return [bag.weight for bag in self.codebooks.embedding_bags.values()]

    # -- conversion and inspection --------------------------------------------------------------

    @classmethod
    def from_ebc(
        cls,
        ebc: EmbeddingBagCollection,
        compressed: dict[str, CompressedTable],
        unknown_id_policy: str = "error",
        kernel: str = "auto",
    ) -> MECEmbeddingBagCollection:
        """A MEC collection of ``ebc``'s tables: those in ``compressed`` take its codes and
        codebooks, the others copy ``ebc``'s weights. Lives on ``ebc.device``."""
        compression = {
            name: MECTableConfig(t.num_subspaces, t.codebook_size) for name, t in compressed.items()
        }
        mec = cls(
            [_copy_config(t) for t in ebc.embedding_bag_configs()],
            compression,
            device=ebc.device,
            unknown_id_policy=unknown_id_policy,
            is_weighted=ebc.is_weighted(),
            kernel=kernel,
        )
        with torch.no_grad():
            for config in ebc.embedding_bag_configs():
                if config.name in compressed:
                    mec.load_compressed(config.name, compressed[config.name])
                else:
                    weight = mec.codebooks.embedding_bags[config.name].weight
                    weight.copy_(ebc.embedding_bags[config.name].weight)
        return mec

    def load_compressed(self, name: str, table: CompressedTable) -> None:
        """Fill table ``name``'s codes and codebooks in place (also after DMP has wrapped it).

        Raises:
            ValueError: ``name`` is not compressed here, or the shapes do not match.
        """
        if name not in self._compression:
            raise ValueError(f"table {name!r} is not compressed (compressed: {self._layout.compressed})")
        codes: torch.Tensor = getattr(self.codes, name)
        mec = self._compression[name]
        dim = self._config(name).embedding_dim
        expected = (codes.shape[0], dim, mec.num_subspaces, mec.codebook_size)
        got = (table.num_rows, table.dim, table.num_subspaces, table.codebook_size)
        if expected != got:
            raise ValueError(f"table {name!r}: expected (N, D, L, K) = {expected}, got {got}")
        with torch.no_grad():
            codes.copy_(table.codes)
            for sub in range(mec.num_subspaces):
                weight = self.codebooks.embedding_bags[sub_name(name, sub)].weight
                weight.copy_(table.codebooks[sub])

    def compressed_tables(self) -> dict[str, CompressedTable]:
        """The current codes and (trained) codebooks of every compressed table, for export."""
        out = {}
        for name in self._layout.compressed:
            subspaces = self._compression[name].num_subspaces
            codebooks = torch.stack(
                [
                    self.codebooks.embedding_bags[sub_name(name, sub)].weight.detach()
                    for sub in range(subspaces)
                ]
            )
            try:
                out[name] = CompressedTable(getattr(self.codes, name).clone(), codebooks.clone())
            except ValueError as e:  # e.g. codebooks trained to NaN
                raise ValueError(f"table {name!r}: {e}") from None
        return out

    def decompress(self) -> EmbeddingBagCollection:
        """An ``EmbeddingBagCollection`` of the same configs holding the decoded weights."""
        ebc = EmbeddingBagCollection(
            tables=[_copy_config(t) for t in self._embedding_bag_configs],
            is_weighted=self._is_weighted,
            device=self._device,
        )
        compressed = self.compressed_tables()
        with torch.no_grad():
            for config in self._embedding_bag_configs:
                source = (
                    compressed[config.name].decode()
                    if config.name in compressed
                    else self.codebooks.embedding_bags[config.name].weight
                )
                ebc.embedding_bags[config.name].weight.copy_(source)
        return ebc

    def embedding_bytes(self) -> dict[str, TableBytes]:
        """Per table: bytes as a full fp32 table vs bytes held here (codes counted)."""
        out = {}
        for config in self._embedding_bag_configs:
            full = config.num_embeddings * config.embedding_dim * 4
            stored = full
            if config.name in self._compression:
                codes: torch.Tensor = getattr(self.codes, config.name)
                subspaces = self._compression[config.name].num_subspaces
                stored = codes.numel() * codes.element_size() + sum(
                    self.codebooks.embedding_bags[sub_name(config.name, s)].weight.numel() * 4
                    for s in range(subspaces)
                )
            out[config.name] = TableBytes(full, stored)
        return out

    def _config(self, name: str) -> EmbeddingBagConfig:
        return next(t for t in self._embedding_bag_configs if t.name == name)


def _check_loaded_codes(module: MECEmbeddingBagCollection, _incompatible: object) -> None:
    """After ``load_state_dict``: codes outside [0, K) would make the fused kernel read past the
    codebooks (the TBE path raises), so they are refused, naming the table."""
    for name, mec in module.compression.items():
        codes: torch.Tensor = getattr(module.codes, name)
        if codes.numel() and codes.device.type != "meta":
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= mec.codebook_size:
                raise ValueError(
                    f"table {name!r}: loaded codes out of range [0, {mec.codebook_size}): "
                    f"min {lo}, max {hi} (a state dict of another codebook size?)"
                )


def _copy_config(config: EmbeddingBagConfig) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(
        num_embeddings=config.num_embeddings,
        embedding_dim=config.embedding_dim,
        name=config.name,
        data_type=config.data_type,
        feature_names=list(config.feature_names),
        weight_init_max=config.weight_init_max,
        weight_init_min=config.weight_init_min,
        init_fn=config.init_fn,
        pooling=config.pooling,
    )
