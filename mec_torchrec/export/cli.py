"""``mec export`` (a checkpoint or saved model -> serving artifact) and ``mec inspect PATH``."""

from __future__ import annotations

import argparse
import json

import torch

from mec_torchrec.cli import UserError
from mec_torchrec.export.format import CODEBOOK_DTYPES, WEIGHT_DTYPES, Manifest
from mec_torchrec.export.reader import read_manifest
from mec_torchrec.export.writer import export_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``mec export`` and ``mec inspect``."""
    export = subparsers.add_parser(
        "export",
        help="write a serving artifact from a checkpoint or a saved model",
        description="Write the MEC tables of a checkpoint or model as a checksummed serving "
        "artifact (manifest.json + one safetensors blob per table), atomically.",
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        help="torch.distributed.checkpoint folder (e.g. the DLRM app's OUT/train_warm/best) or a "
        "torch.save'd state dict",
    )
    source.add_argument(
        "--model", help="a torch.save'd model (nn.Module) holding one MECEmbeddingBagCollection"
    )
    export.add_argument("--out", required=True, help="artifact folder (replaced if it exists)")
    export.add_argument("--codebook-dtype", choices=CODEBOOK_DTYPES, default="fp32")
    export.add_argument(
        "--weight-dtype",
        choices=WEIGHT_DTYPES,
        default="fp32",
        help="storage of the tables MEC did not compress: fp32, or int8 row-wise (D bytes + "
        "float32 scale and bias per row; served in that form)",
    )
    export.add_argument(
        "--features",
        help='JSON {"table": ["feature", ...]} for checkpoints (default: table t_X serves X)',
    )
    export.set_defaults(func=_export)

    inspect = subparsers.add_parser(
        "inspect", help="print an artifact's manifest, sizes and compression ratio"
    )
    inspect.add_argument("path", help="artifact folder")
    inspect.set_defaults(func=_inspect)


def _export(args: argparse.Namespace) -> int:
    features = _features(args.features) if args.features else None
    if args.model:
        # A pickled model runs code on load: only for files the user made (say so in the help).
        try:
            source = torch.load(args.model, map_location="cpu", weights_only=False)
        except FileNotFoundError:
            raise UserError(f"--model {args.model}: no such file") from None
        except Exception as e:  # unpickling a bad file raises many types
            raise UserError(
                f"--model {args.model}: not a readable torch.save file ({type(e).__name__}: {e})"
            ) from e
        if not isinstance(source, torch.nn.Module):
            raise UserError(
                f"--model {args.model}: holds a {type(source).__name__}, expected an "
                f"nn.Module (use --checkpoint for a state dict)"
            )
    else:
        source = args.checkpoint
    manifest = export_model(
        source, args.out, args.codebook_dtype, weight_dtype=args.weight_dtype,
        feature_names=features,
    )  # fmt: skip
    print(describe(manifest, args.out))
    return 0


def _features(text: str) -> dict[str, list[str]]:
    try:
        features = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--features: not valid JSON ({e})") from None
    if not isinstance(features, dict) or not all(
        isinstance(v, list) and all(isinstance(f, str) for f in v) for v in features.values()
    ):
        raise UserError(f'--features: expected {{"table": ["feature", ...]}}, got {text}')
    return features


def _inspect(args: argparse.Namespace) -> int:
    print(describe(read_manifest(args.path), args.path))
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _checksum_line(manifest: Manifest) -> str:
    if manifest.manifest_sha256 is None:
        return f"manifest_sha256: none (a v{manifest.format_version} manifest carries none)"
    return f"manifest_sha256: {manifest.manifest_sha256} (matches its content)"


def describe(manifest: Manifest, path: object) -> str:
    """The manifest as a table: its checksum, one line per table, totals and the ratio (codes
    counted)."""
    header = (
        f"{'table':<16} {'features':<16} {'rows':>10} {'dim':>4} {'L':>3} {'K':>6} "
        f"{'codes':>6} {'dtype':>5} {'pool':>4} {'MiB':>9} {'fp32 MiB':>9} {'ratio':>7}"
    )
    lines = [
        (
            f"{path}: {manifest.format} v{manifest.format_version}, {len(manifest.tables)} "
            f"tables, weighted={manifest.is_weighted}, unknown ids: {manifest.unknown_id_policy}"
        ),
        _checksum_line(manifest),
        header,
        "-" * len(header),
    ]
    for t in manifest.tables:
        features = ",".join(t.feature_names)
        lines.append(
            f"{t.name:<16} {features[:16]:<16} {t.num_embeddings:>10} {t.embedding_dim:>4} "
            f"{t.num_subspaces or '-':>3} {t.codebook_size or '-':>6} {t.code_dtype or '-':>6} "
            f"{t.codebook_dtype or t.weight_dtype or 'fp32':>5} {t.pooling[:4]:>4} "
            f"{_mib(t.blob_bytes):>9} "
            f"{_mib(t.full_bytes):>9} {t.full_bytes / t.blob_bytes:>6.1f}x"
        )
    total, full = manifest.total_bytes(), manifest.full_bytes()
    lines.append("-" * len(header))
    lines.append(
        f"{'total':<16} {'':<16} {sum(t.num_embeddings for t in manifest.tables):>10} "
        f"{'':>4} {'':>3} {'':>6} {'':>6} {'':>5} {'':>4} {_mib(total):>9} {_mib(full):>9} "
        f"{full / total:>6.1f}x"
    )
    lines.append(f"bytes on disk {total} (blobs, headers included) vs fp32 {full}")
    return "\n".join(lines)
