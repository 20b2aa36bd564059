"""Data-parallel wrappers: the module inside, and the prefix they add to parameter names.

Used by the analysis (to read the wrapped model) and the optimizer (to name parameters as
the analysis does), so both agree without importing each other.
"""
from __future__ import annotations

import torch

#: The prefix data-parallel wrappers add to parameter names (`DistributedDataParallel.module`).
WRAPPER_PREFIX = "module."


def unwrap_data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers (the model itself
    otherwise): its parameters are the same tensors, named without the "module." prefix."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model
