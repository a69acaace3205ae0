"""PooledRegroup: the module's regroup applied to sharded output as one block permute."""

import torch
from dist_models import COMPRESSION, TABLES
from torchrec.sparse.jagged_tensor import KeyedTensor

from mec_torchrec.distributed.regroup import PooledRegroup
from mec_torchrec.modules import MECEmbeddingBagCollection


def sharding_ordered_output(mec: MECEmbeddingBagCollection, batch: int = 3) -> KeyedTensor:
    """A codebook-EBC output with its feature blocks in a shuffled ('sharding') order."""
    configs = mec.codebooks.embedding_bag_configs()
    blocks = [(f, c.embedding_dim) for c in configs for f in c.feature_names]
    blocks = blocks[::2] + blocks[1::2]
    g = torch.Generator().manual_seed(0)
    values = torch.randn(batch, sum(d for _, d in blocks), generator=g, requires_grad=True)
    return KeyedTensor(keys=[f for f, _ in blocks], length_per_key=[d for _, d in blocks],
                       values=values)


def test_block_permute_matches_regroup_forward_and_backward() -> None:
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION)
    pooled = sharding_ordered_output(mec)
    want = mec.regroup(pooled.to_dict())
    got = PooledRegroup(mec.regroup)(pooled)
    assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
    assert torch.equal(got.values(), want.values())
    weights = torch.randn_like(want.values())
    (want_grad,) = torch.autograd.grad((want.values() * weights).sum(), pooled.values())
    (got_grad,) = torch.autograd.grad((got.values() * weights).sum(), pooled.values())
    assert torch.equal(got_grad, want_grad)


def test_falls_back_to_regroup_when_it_is_not_a_block_permutation() -> None:
    mec = MECEmbeddingBagCollection(TABLES, COMPRESSION)

    def doubling_regroup(pooled: dict[str, torch.Tensor]) -> KeyedTensor:
        out = mec.regroup(pooled)
        return KeyedTensor(out.keys(), out.length_per_key(), out.values() * 2)

    pooled = sharding_ordered_output(mec)
    got = PooledRegroup(doubling_regroup)(pooled)
    assert torch.equal(got.values(), doubling_regroup(pooled.to_dict()).values())
