"""The compiled serving kernels, as operators that TorchScript graphs call: ``torch.ops.mec_lookup``.

The lookup extension of the training module (``modules/csrc/mec_lookup.cpp``) registers three CPU
operators when its library loads:

* ``serve_one_hot(values, codes, weight, feature_plan, stride, per_id, packed, packed_plan)``: a
  fused lookup whose bags hold one id each (``fused.compiled_pooled_lookup``);
* ``serve_pooled(values, offsets, per_id, weight, codes, feature_plan, feature_is_mean, stride,
  packed, packed_plan)``: a fused lookup of any bags (the training module's pooling loops over the
  stacked buffers; ``fused.compiled_pooled_lookup``);
* ``ids_in_range(values, lengths, sizes) -> bool``: the id check of a valid batch in one pass
  (integer ids, lengths non-negative and summing to the number of ids, every id within its
  feature's table; ``ops.compiled_check_ids``).

The serving module picks them or the ATen ops in Python at every forward (``serves``); fx tracing
records that pick, so a scripted module calls the operators when they were loaded where it was
scripted, and a process that loads it with ``torch.jit.load`` needs them registered first.
Importing ``mec_torchrec.export`` loads them when the extension is already built (a fraction of a
second, never a compile); ``load_ops()`` also builds it (about a minute, once per environment).
"""

import torch

from mec_torchrec.modules import fused as modules_fused


def load_ops() -> bool:
    """Register ``torch.ops.mec_lookup.*``, building the extension if needed; whether they are.

    Call it before ``torch.jit.load`` of a scripted serving model in an environment where the
    extension has not been built yet (``Unknown builtin op: mec_lookup::ids_in_range``).
    """
    return modules_fused.extension() is not None


def serves(buffer: torch.Tensor) -> bool:
    """Whether the compiled operators serve a module whose buffers live where ``buffer`` does:
    on CPU, the extension loaded (never builds it), outside ``torch.export`` (an exported
    program keeps the ATen ops; the operators have no meta kernels)."""
    return (
        buffer.device.type == "cpu"
        and modules_fused.loaded()
        and not torch.compiler.is_exporting()
    )


if modules_fused.is_built():
    load_ops()
