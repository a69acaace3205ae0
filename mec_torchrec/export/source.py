"""Where an export's tables come from: a MEC module, a model holding one, a state dict, a checkpoint.

Everything is reduced to :class:`ExportTables` (configs in EBC order, the compressed tables' codes
and codebooks, the full tables' weights). A state dict or checkpoint carries no configs, so they are
read from the tensors' names and shapes: ``<prefix>codes.<table>`` [N, L] and
``<prefix>codebooks.embedding_bags.<table>@<l>.weight`` [K, D / L] for a compressed table,
``<prefix>codebooks.embedding_bags.<table>.weight`` [N, D] for a full one. Feature names default to
the data layer's convention (table ``t_X`` serves feature ``X``) and pooling to SUM; both can be
given.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from mec_torchrec.modules import MECEmbeddingBagCollection
from mec_torchrec.quantize.table import CompressedTable

_CODES = re.compile(r"^(?P<prefix>.*?)codes\.(?P<table>[^.@]+)$")
_INNER = re.compile(
    r"^(?P<prefix>.*?)codebooks\.embedding_bags\.(?P<table>[^.@]+)(@(?P<sub>\d+))?\.weight$"
)


@dataclass
class ExportTables:
    """What an artifact is written from.

    Attributes:
        configs: the outer tables, in the order the EBC outputs them.
        compressed: codes and codebooks of the compressed tables.
        full: float weights [N, D] of the other tables.
        is_weighted: whether input weights multiply the rows.
        unknown_id_policy: the serving default for out-of-range ids.
    """

    configs: list[EmbeddingBagConfig]
    compressed: dict[str, CompressedTable]
    full: dict[str, torch.Tensor]
    is_weighted: bool = False
    unknown_id_policy: str = "error"


def from_module(module: MECEmbeddingBagCollection) -> ExportTables:
    """The tables of a MEC collection (its trained codebooks, its codes, its full tables)."""
    compressed = module.compressed_tables()
    bags = module.codebooks.embedding_bags
    full = {
        c.name: bags[c.name].weight.detach().float().cpu()
        for c in module.embedding_bag_configs()
        if c.name not in compressed
    }
    return ExportTables(
        configs=list(module.embedding_bag_configs()),
        compressed={name: table.to("cpu") for name, table in compressed.items()},
        full=full,
        is_weighted=module.is_weighted(),
        unknown_id_policy=module.unknown_id_policy,
    )


def find_mec_module(model: nn.Module) -> MECEmbeddingBagCollection:
    """The one MECEmbeddingBagCollection inside ``model`` (``model`` itself included).

    Raises:
        ValueError: none, or several (export each one separately).
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, MECEmbeddingBagCollection)]
    if not found:
        raise ValueError(f"{type(model).__name__} holds no MECEmbeddingBagCollection")
    if len(found) > 1:
        names = [n or "<root>" for n, _ in found]
        raise ValueError(f"several MECEmbeddingBagCollections ({names}): export one at a time")
    return found[0][1]


def default_features(table: str) -> list[str]:
    """The data layer's naming: table ``t_C3`` serves feature ``C3``; otherwise the table name."""
    return [table[2:]] if table.startswith("t_") and len(table) > 2 else [table]


def from_state_dict(
    state: Mapping[str, torch.Tensor],
    feature_names: Mapping[str, list[str]] | None = None,
    pooling: Mapping[str, PoolingType] | None = None,
    is_weighted: bool = False,
) -> ExportTables:
    """Tables read from a MEC module's state dict (any prefix, e.g. ``model.sparse_arch...``).

    Raises:
        ValueError: no MEC tensors, several MEC modules (prefixes), or a compressed table whose
            codebooks are missing or disagree with its codes.
    """
    codes: dict[str, torch.Tensor] = {}
    inner: dict[str, dict[int | None, torch.Tensor]] = {}
    order: list[str] = []
    prefixes = set()
    for key, value in state.items():
        if (m := _CODES.match(key)) is not None:
            prefixes.add(m["prefix"])
            codes[m["table"]] = value
        elif (m := _INNER.match(key)) is not None:
            prefixes.add(m["prefix"])
            table = m["table"]
            if table not in inner:
                inner[table] = {}
                order.append(table)
            inner[table][int(m["sub"]) if m["sub"] is not None else None] = value
    if not inner:
        raise ValueError("state dict holds no MEC tensors (codes.* / codebooks.embedding_bags.*)")
    if len(prefixes) > 1:
        raise ValueError(f"state dict holds several MEC modules (prefixes {sorted(prefixes)})")
    feature_names = feature_names or {}
    pooling = pooling or {}
    configs, compressed, full = [], {}, {}
    for name in order:
        parts = inner[name]
        if name in codes:
            subs = sorted(k for k in parts if k is not None)
            if subs != list(range(codes[name].shape[1])):
                raise ValueError(
                    f"table {name!r}: codes have {codes[name].shape[1]} subspaces but codebooks "
                    f"{name}@{subs} were found"
                )
            try:
                table = CompressedTable(codes[name], torch.stack([parts[s].float() for s in subs]))
            except ValueError as e:
                raise ValueError(f"table {name!r}: {e}") from None
            compressed[name] = table
            rows, dim = table.num_rows, table.dim
        else:
            full[name] = parts[None].float()
            rows, dim = full[name].shape
        configs.append(
            EmbeddingBagConfig(
                name=name,
                num_embeddings=rows,
                embedding_dim=dim,
                feature_names=list(feature_names.get(name, default_features(name))),
                pooling=pooling.get(name, PoolingType.SUM),
            )
        )
    return ExportTables(configs, compressed, full, is_weighted=is_weighted)


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The MEC tensors of a checkpoint, whole (unsharded), on CPU.

    ``path`` is a ``torch.distributed.checkpoint`` folder (as the DLRM app writes, sharded tables
    included: DCP gathers each table's shards into the full tensor) or a ``torch.save`` file of a
    state dict (or of ``{"model": state_dict}``). Only codes and codebook/full-table weights are
    read; dense layers and optimizer state are skipped.
    """
    path = Path(path)
    if path.is_dir():
        return _read_dcp(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (unpickling, zip, struct) for bad files
        raise ValueError(f"{path}: not a readable torch.save file ({type(e).__name__}: {e})") from e
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError(  # noqa: TRY004 (the file's content is bad, not the argument)
            f"{path}: expected a state dict, got {type(state).__name__}"
        )
    return dict(state)


def _read_dcp(path: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (path / ".metadata").exists():
        raise FileNotFoundError(
            f"{path} is not a torch.distributed.checkpoint folder (no .metadata)"
        )
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # an unpickling error of any type
        raise ValueError(f"{path}/.metadata: not readable ({type(e).__name__}: {e})") from e
    state = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and (_CODES.match(key) or _INNER.match(key))
    }
    if not state:
        raise ValueError(f"{path}: checkpoint holds no MEC tensors")
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state


def resolve(
    source: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    feature_names: Mapping[str, list[str]] | None = None,
    pooling: Mapping[str, PoolingType] | None = None,
) -> ExportTables:
    """ExportTables from any accepted source (see ``export_model``).

    Raises:
        ValueError: naming the table, for codebooks or full-table weights with NaN or inf (a
            model trained into divergence is refused, not served); ``feature_names`` or
            ``pooling`` for tables that are not exported; a table serving no feature, or a
            feature served by several tables (the artifact could not be served).
    """
    if isinstance(source, nn.Module):
        tables = from_module(find_mec_module(source))
    elif isinstance(source, Mapping):
        tables = from_state_dict(source, feature_names, pooling)
    else:
        tables = from_state_dict(read_checkpoint(source), feature_names, pooling)
    for name, weight in tables.full.items():
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"table {name!r}: weights contain NaN or inf")
    names = [c.name for c in tables.configs]
    for option, given in (("feature_names", feature_names), ("pooling", pooling)):
        unknown = sorted(set(given or {}) - set(names))
        if unknown and not isinstance(source, nn.Module):
            raise ValueError(f"{option} names tables {unknown} that are not exported ({names})")
    empty = [c.name for c in tables.configs if not c.feature_names]
    if empty:
        raise ValueError(f"tables {empty} serve no feature")
    features = [f for c in tables.configs for f in c.feature_names]
    repeated = sorted({f for f in features if features.count(f) > 1})
    if repeated:
        raise ValueError(f"features {repeated} are served by several tables")
    return tables
