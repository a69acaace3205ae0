"""ShardedRegroup: the sharded codebook output as MEC features, without copies when possible."""

import torch
from dist_models import COMPRESSION, FEATURES, TABLES
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionAwaitable
from torchrec.distributed.types import NoWait

from mec_torchrec.distributed.regroup import RegroupedPooledAwaitable, ShardedRegroup, regrouped
from mec_torchrec.modules import MECEmbeddingBagCollection


def inner_blocks(mec: MECEmbeddingBagCollection) -> list[tuple[str, int]]:
    """(inner feature, dim) with each feature's f@0, f@1 side by side (as for one-feature tables
    planned data_parallel)."""
    blocks = [(f, c.embedding_dim) for c in mec.codebooks.embedding_bag_configs()
              for f in c.feature_names]
    return sorted(blocks, key=lambda block: FEATURES.index(block[0].split("@")[0]))


def output(
    blocks: list[tuple[str, int]], split: int
) -> tuple[EmbeddingBagCollectionAwaitable, list[torch.Tensor]]:
    """A sharded codebook EBC output: two per-sharding parts holding `blocks` in this order."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(3, sum(d for _, d in group), generator=g, requires_grad=True)
             for group in (blocks[:split], blocks[split:])]
    awaitable = EmbeddingBagCollectionAwaitable(
        awaitables=[NoWait(p) for p in parts],
        embedding_dims=[d for _, d in blocks],
        embedding_names=[f for f, _ in blocks],
    )
    return awaitable, parts


def check_matches_regroup(mec: MECEmbeddingBagCollection, blocks: list[tuple[str, int]]) -> None:
    reference_awaitable, reference_parts = output(blocks, 3)
    want = mec.regroup(reference_awaitable.wait().to_dict()).to_dict()
    awaitable, parts = output(blocks, 3)
    lazy = regrouped(awaitable, ShardedRegroup(mec.regroup))
    assert isinstance(lazy, RegroupedPooledAwaitable)
    got = lazy.wait().to_dict()
    assert sorted(got) == sorted(want)
    weights = {k: torch.randn_like(v) for k, v in want.items()}
    want_loss = sum((want[k] * w).sum() for k, w in weights.items())
    got_loss = sum((got[k] * w).sum() for k, w in weights.items())
    for k in want:
        assert torch.equal(got[k], want[k]), k
    got_grads = torch.autograd.grad(got_loss, parts)
    want_grads = torch.autograd.grad(want_loss, reference_parts)
    assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads, strict=True))


def test_side_by_side_sub_features_are_merged_without_a_copy() -> None:
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION)
    blocks = inner_blocks(mec)
    part = torch.randn(2, sum(d for _, d in blocks))
    names, dims = [f for f, _ in blocks], [d for _, d in blocks]
    out = ShardedRegroup(mec.regroup)([part], names, dims)
    assert out.values() is part
    assert out.keys() == ["f_a", "f_a2", "f_b", "f_c"]
    check_matches_regroup(mec, blocks)


def test_scattered_sub_features_go_through_regroup() -> None:
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION)
    blocks = inner_blocks(mec)
    check_matches_regroup(mec, blocks[::2] + blocks[1::2])  # f@0s first, then the f@1s


def test_awaitable_with_callbacks_gets_the_regroup_as_a_callback() -> None:
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION)
    awaitable, _ = output(inner_blocks(mec), 3)
    awaitable.callbacks.append(lambda keyed: keyed)  # e.g. TorchRec's mean-pooling callback
    lazy = regrouped(awaitable, ShardedRegroup(mec.regroup))
    assert lazy is awaitable
    assert sorted(lazy.wait().keys()) == ["f_a", "f_a2", "f_b", "f_c"]
