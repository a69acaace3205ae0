"""What a TorchRec user could do instead of MEC: the hashing trick, quotient-remainder
embeddings, TorchRec's post-training row-wise quantization; each with bytes counted as stored."""

from mec_torchrec.baselines.budget import hash_buckets, qr_remainder
from mec_torchrec.baselines.hashing import HashedEmbeddingBagCollection
from mec_torchrec.baselines.ptq import PTQ_DTYPES, quantize_ebc, stored_bytes
from mec_torchrec.baselines.qr import QREmbeddingBagCollection

__all__ = [
    "PTQ_DTYPES",
    "HashedEmbeddingBagCollection",
    "QREmbeddingBagCollection",
    "hash_buckets",
    "qr_remainder",
    "quantize_ebc",
    "stored_bytes",
]
