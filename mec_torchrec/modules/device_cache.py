"""Small index tensors made from static Python lists, on the device the data is on.

The module's index metadata (table sizes, feature sources, kernel offsets) is configuration, not
state: keeping it as Python tuples and materialising it per device on first use means a module
built on the meta device, moved with ``to_empty`` / ``to``, or sharded, never serves stale or
uninitialised index buffers.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=512)
def _cached(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def device_tensor(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype, device)``, built once per (values, dtype, device).

    The returned tensor is shared: callers must not modify it.

    Example::

        device_tensor((0, 3, 5), torch.int64, torch.device("cpu"))  # tensor([0, 3, 5])
    """
    return _cached(values, dtype, device)
