"""Paper calculation: embedding memory per rank and all-to-all bytes per batch, by world size.

For Criteo Terabyte (the 26 cardinalities of TorchRec's DLRM example for the 1 TB click logs)
and for one 10-billion-id table, on 8, 64 and 512 GPUs, three ways to hold the tables:

* full: fp32 tables, sharded table-wise when a table fits in one GPU's memory, else row-wise
  (the 10B table is 5.1 TB and must be row-wise); a table-wise plan holds at least the largest
  table on one rank, so finer plans (row-wise or column-wise splits of the large tables) would
  trade memory for more pooled traffic;
* MEC, replicated codes: tables of >= --min-rows rows become N x L uint8 codes on every rank plus
  L codebooks of K x D/L fp32, data-parallel (the planner's default); the others stay full;
* MEC, sharded codes: the same, with the codes sharded row-wise over all ranks; ids travel to the
  rank owning their row, which returns their L codes (mec_torchrec/distributed/codes.py).

Per rank, forward pass, bytes sent by one rank (what it receives is the same on average):
* ids all-to-all: B x P ids of 8 bytes (int64) per feature, a fraction (W - 1) / W of which
  leaves the rank; plus lengths (4 bytes per sample): B for a table-wise feature (to its owner),
  B to every other rank for a row-wise one; sharded codes keep the lengths local;
* pooled all-to-all: table-wise, the owner sends each other rank its B x D fp32 pooled rows
  (B x D x 4 x (W - 1) / W per feature and rank on average); row-wise, every rank sends partial
  sums of every feature to every other rank (a reduce-scatter: B x D x 4 x (W - 1) per feature);
  backward sends the gradients of the same tensors again (not added below);
* codes all-to-all (sharded codes): B x P x L bytes back per compressed feature, x (W - 1) / W
  (ids and codes are upper bounds: the exchange sends each distinct id of a batch once);
* codebook all-reduce (MEC): K x D x 4 bytes of gradients per compressed table and step, a ring
  all-reduce sending about twice that per rank; listed separately, it is not an all-to-all.

Optimizer state, activations, dense layers and the KJT buffers are not counted.

    .venv/bin/python tools/bench/scaling.py            # the table of docs/scaling.md
"""

import argparse
from dataclasses import dataclass

#: TorchRec DLRM example, Criteo 1 TB click logs (`--num_embeddings_per_feature` default).
CRITEO_TERABYTE = [
    45833188,
    36746,
    17245,
    7413,
    20243,
    3,
    7114,
    1441,
    62,
    29275261,
    1572176,
    345138,
    10,
    2209,
    11267,
    128,
    4,
    974,
    14,
    48937457,
    11316796,
    40094537,
    452104,
    12606,
    104,
    35,
]
TEN_BILLION = [10_000_000_000]
WORLD_SIZES = [8, 64, 512]
GB = 1e9


@dataclass(frozen=True)
class Settings:
    dim: int  # D
    subspaces: int  # L
    codebook_size: int  # K
    batch_size: int  # B, per rank
    pooling: int  # P, ids per feature and sample
    min_rows: int  # tables with at least this many rows are compressed
    hbm: float  # bytes of one GPU's memory (table-wise if a full table fits)


@dataclass(frozen=True)
class Row:
    memory: float  # embedding bytes on the fullest rank
    ids_a2a: float  # bytes of ids (and lengths) one rank sends per batch
    codes_a2a: float  # bytes of codes one rank sends back per batch
    pooled_a2a: float  # bytes of pooled embeddings one rank sends per batch (forward)
    allreduce: float  # bytes of codebook gradients all-reduced per step


def estimate(cardinalities: list[int], s: Settings, world: int, how: str) -> Row:
    """Memory and traffic of one way to hold `cardinalities` (`full`, `replicated`, `sharded`)."""
    away = (world - 1) / world
    row_wise, table_wise, largest = 0.0, 0.0, 0.0
    ids, codes, pooled, allreduce, mec = 0.0, 0.0, 0.0, 0.0, 0.0
    for rows in cardinalities:
        if how == "full" or rows < s.min_rows:
            table = rows * s.dim * 4
            ids += s.batch_size * s.pooling * 8 * away
            if table <= s.hbm:  # table-wise: one owner per table
                table_wise, largest = table_wise + table, max(largest, table)
                ids += s.batch_size * 4 * away
                pooled += s.batch_size * s.dim * 4 * away
            else:  # row-wise: lengths and partial sums go to / come from every rank
                row_wise += table / world
                ids += s.batch_size * 4 * (world - 1)
                pooled += s.batch_size * s.dim * 4 * (world - 1)
            continue
        codebooks = s.codebook_size * s.dim * 4
        allreduce += 2 * codebooks * away
        if how == "replicated":
            mec += rows * s.subspaces + codebooks
        else:
            mec += -(-rows // world) * s.subspaces + codebooks
            ids += s.batch_size * s.pooling * 8 * away
            codes += s.batch_size * s.pooling * s.subspaces * away
    # Table-wise tables: the planner balances them at best to 1/W of the total each, and the
    # rank holding the largest one holds at least that.
    memory = row_wise + max(table_wise / world, largest) + mec
    return Row(memory, ids, codes, pooled, allreduce)


def human(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def table(s: Settings) -> str:
    lines = [
        (
            "| data | GPUs | tables | memory / rank | ids a2a / rank | codes a2a / rank "
            "| pooled a2a / rank (fwd) | codebook all-reduce | fits one GPU |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cards in (("Criteo Terabyte", CRITEO_TERABYTE), ("10B-id table", TEN_BILLION)):
        for world in WORLD_SIZES:
            for how, label in (
                ("full", "full fp32"),
                ("replicated", "MEC, replicated codes"),
                ("sharded", "MEC, sharded codes"),
            ):
                r = estimate(cards, s, world, how)
                lines.append(
                    f"| {name} | {world} | {label} | {human(r.memory)} | {human(r.ids_a2a)} | "
                    f"{human(r.codes_a2a)} | {human(r.pooled_a2a)} | {human(r.allreduce)} | "
                    f"{'yes' if r.memory < s.hbm else '**no**'} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=128, help="D")
    parser.add_argument("--subspaces", type=int, default=4, help="L")
    parser.add_argument("--codebook-size", type=int, default=256, help="K (uint8 codes)")
    parser.add_argument("--batch-size", type=int, default=4096, help="B per rank")
    parser.add_argument("--pooling", type=int, default=1, help="P, ids per feature and sample")
    parser.add_argument("--min-rows", type=int, default=100_000)
    parser.add_argument("--hbm-gb", type=float, default=80.0)
    args = parser.parse_args()
    if args.codebook_size > 256:
        parser.error("this calculation assumes uint8 codes (K <= 256)")
    s = Settings(
        args.dim,
        args.subspaces,
        args.codebook_size,
        args.batch_size,
        args.pooling,
        args.min_rows,
        args.hbm_gb * GB,
    )
    print(
        f"D = {s.dim}, L = {s.subspaces}, K = {s.codebook_size}, B = {s.batch_size} per rank, "
        f"P = {s.pooling}, compressed if N >= {s.min_rows:,}, {args.hbm_gb:g} GB per GPU"
    )
    for name, cards in (("Criteo Terabyte", CRITEO_TERABYTE), ("10B-id table", TEN_BILLION)):
        compressed = sum(n for n in cards if n >= s.min_rows)
        tables = f"{len(cards)} table" + ("s" if len(cards) > 1 else "")
        print(
            f"{name}: {tables}, {sum(cards):,} rows, {compressed:,} compressed; "
            f"full fp32 {human(sum(cards) * s.dim * 4)}, codes {human(compressed * s.subspaces)}"
        )
    print()
    print(table(s))


if __name__ == "__main__":
    main()
