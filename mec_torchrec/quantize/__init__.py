"""Product quantization of embedding tables: CompressedTable and the quantizers that make it."""

from mec_torchrec.quantize.exact import head_rows, reserve_exact_rows
from mec_torchrec.quantize.mec import MECQuantizer
from mec_torchrec.quantize.metric import FisherCollector, SubspaceMetric, fit_table
from mec_torchrec.quantize.pq import PQQuantizer
from mec_torchrec.quantize.table import CompressedTable, TableFileError, code_dtype, decode_codes

__all__ = [
    "CompressedTable",
    "FisherCollector",
    "MECQuantizer",
    "PQQuantizer",
    "SubspaceMetric",
    "TableFileError",
    "code_dtype",
    "decode_codes",
    "fit_table",
    "head_rows",
    "reserve_exact_rows",
]
