"""Freeze a serving model for deployment: ``torch.export`` with batch-size-free shapes, TorchScript."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch import nn
from torchrec.fx import symbolic_trace


def dynamic_shapes(args: tuple) -> tuple:
    """Every tensor dimension of ``args`` (KeyedJaggedTensors included) marked ``Dim.AUTO``.

    TorchRec registers ``KeyedJaggedTensor`` as a pytree whose leaves are its values, weights,
    lengths and offsets (keys are static); each tensor leaf gets automatic dynamic sizes, so the
    program serves any batch size and any number of ids.
    """
    auto = torch.export.Dim.AUTO
    shapes = []
    for arg in args:
        leaves, spec = pytree.tree_flatten(arg)
        marks = [(auto,) * x.dim() if isinstance(x, torch.Tensor) else None for x in leaves]
        shapes.append(marks[0] if spec.is_leaf() else marks)
    return tuple(shapes)


def export_program(model: nn.Module, args: tuple) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) of ``model`` on example ``args``, sizes left dynamic.

    The program calls ``torch.ops.mec_torchrec.checked_ids``; load it where
    ``mec_torchrec.export`` is imported.

    Example::

        program = export_program(dlrm, (dense, kjt))
        torch.export.save(program, "dlrm.pt2")
    """
    # Size-oblivious tracing keeps batch size 1 (and empty id lists) inside the program's range:
    # by default export assumes a dynamic size is neither 0 nor 1.
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        return torch.export.export(
            model, args, dynamic_shapes=dynamic_shapes(args), strict=False
        )


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript via torchrec's fx tracing (``symbolic_trace`` then ``torch.jit.script``)."""
    return torch.jit.script(symbolic_trace(model))
