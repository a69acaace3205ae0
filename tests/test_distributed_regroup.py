"""regrouped: the module's regroup applied to the sharded codebook output with one copy."""

import torch
from dist_models import COMPRESSION, TABLES
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionAwaitable
from torchrec.distributed.types import NoWait
from torchrec.sparse.jagged_tensor import KeyedTensor

from mec_torchrec.distributed.regroup import RegroupedPooledAwaitable, regrouped
from mec_torchrec.modules import MECEmbeddingBagCollection


def sharded_output(mec: MECEmbeddingBagCollection) -> tuple[EmbeddingBagCollectionAwaitable, list[torch.Tensor]]:
    """What the sharded codebook EBC returns: per-sharding outputs, features in sharding order."""
    configs = mec.codebooks.embedding_bag_configs()
    blocks = [(f, c.embedding_dim) for c in configs for f in c.feature_names]
    blocks = blocks[::2] + blocks[1::2]
    groups = [blocks[:3], blocks[3:]]  # e.g. data-parallel features, then table-wise ones
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(3, sum(d for _, d in group), generator=g, requires_grad=True)
             for group in groups]
    awaitable = EmbeddingBagCollectionAwaitable(
        awaitables=[NoWait(p) for p in parts],
        embedding_dims=[d for _, d in blocks],
        embedding_names=[f for f, _ in blocks],
    )
    return awaitable, parts


def expected(mec: MECEmbeddingBagCollection) -> tuple[KeyedTensor, list[torch.Tensor]]:
    awaitable, parts = sharded_output(mec)
    return mec.regroup(awaitable.wait().to_dict()), parts


def test_one_copy_path_matches_regroup_forward_and_backward() -> None:
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION)
    want, want_parts = expected(mec)
    awaitable, parts = sharded_output(mec)
    lazy = regrouped(awaitable, mec.regroup)
    assert isinstance(lazy, RegroupedPooledAwaitable)
    got = lazy.wait()
    assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
    assert torch.equal(got.values(), want.values())
    weights = torch.randn_like(want.values())
    want_grads = torch.autograd.grad((want.values() * weights).sum(), want_parts)
    got_grads = torch.autograd.grad((got.values() * weights).sum(), parts)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)


def test_awaitable_with_callbacks_gets_regroup_as_a_callback() -> None:
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION)
    want, _ = expected(mec)
    awaitable, _ = sharded_output(mec)
    awaitable.callbacks.append(lambda keyed: keyed)  # e.g. TorchRec's mean-pooling callback
    lazy = regrouped(awaitable, mec.regroup)
    assert lazy is awaitable
    assert torch.equal(lazy.wait().values(), want.values())
