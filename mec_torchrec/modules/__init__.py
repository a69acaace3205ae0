"""Single-device MEC modules: a drop-in EmbeddingBagCollection backed by codes and codebooks."""

from mec_torchrec.modules.config import MECTableConfig, TableBytes
from mec_torchrec.modules.embedding_bag import MECEmbeddingBagCollection

__all__ = ["MECEmbeddingBagCollection", "MECTableConfig", "TableBytes"]
