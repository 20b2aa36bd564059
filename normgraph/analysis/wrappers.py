"""Models wrapped for distributed training, seen as the plain module the analysis needs.

DDP (`DistributedDataParallel`) holds the model in `.module`: the analysis reads that, and
its parameter names carry no "module." prefix. FSDP2 (`fully_shard`) replaces parameters
with sharded DTensors and adds hooks that gather them in forward, which no tracer follows;
the analysis then runs on a *shadow*: the same module tree with the original classes, no
hooks, and every parameter and buffer replaced by a meta tensor of its full (global) shape.
Nothing is gathered or copied: analysis reads only shapes and the graph. (Known constant
buffers, e.g. a stored √d, then have no values: their rules use the fallback for unknown
constants.)
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ..core.wrappers import unwrap_data_parallel

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def is_sharded(model: torch.nn.Module) -> bool:
    """True when some parameter is a DTensor (FSDP2 / tensor parallel)."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def _plain_class(mod: torch.nn.Module) -> type:
    """The class `fully_shard` derived `FSDP<Name>` from (the module's own class otherwise)."""
    from torch.distributed.fsdp import FSDPModule
    for cls in type(mod).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls
    return type(mod)


def meta_shadow(model: torch.nn.Module) -> torch.nn.Module:
    """The module tree of `model` with plain classes, no hooks, and meta tensors of the full
    shapes in place of its parameters and buffers (tied parameters stay tied)."""
    tensors: dict[int, torch.Tensor] = {}

    def meta(t: torch.Tensor | None, param: bool) -> Any:
        if t is None:
            return None
        if id(t) not in tensors:
            empty = torch.empty(t.shape, dtype=t.dtype, device="meta")
            tensors[id(t)] = torch.nn.Parameter(empty, requires_grad=t.requires_grad) if param else empty
        return tensors[id(t)]

    def shadow(mod: torch.nn.Module, done: dict[int, torch.nn.Module]) -> torch.nn.Module:
        if id(mod) in done:  # a module used twice stays one module
            return done[id(mod)]
        new = _plain_class(mod).__new__(_plain_class(mod))
        new.__dict__.update(copy.copy(mod.__dict__))
        done[id(mod)] = new
        new._parameters = {n: meta(p, True) for n, p in mod._parameters.items()}
        new._buffers = {n: meta(b, False) for n, b in mod._buffers.items()}
        new._modules = {n: (shadow(c, done) if c is not None else None) for n, c in mod._modules.items()}
        for name in _HOOK_DICTS:
            if name in mod.__dict__:
                setattr(new, name, OrderedDict())
        return new

    return shadow(model, {})


def to_meta(inputs: Any) -> Any:
    """Example inputs on the meta device (what the shadow model runs on)."""
    return tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, inputs)


def on_meta(model: torch.nn.Module) -> bool:
    """True when some parameter of `model` is a meta tensor (a model built under
    `torch.device("meta")`, or an FSDP2 shadow): it has shapes but no data."""
    return any(p.is_meta for p in model.parameters())


def analysable(model: torch.nn.Module, args: Any, kwargs: Any) -> tuple[torch.nn.Module, Any, Any, str]:
    """(module to analyse, its example args and kwargs, a note) for a possibly wrapped model."""
    inner = unwrap_data_parallel(model)
    note = f"analysed {type(inner).__name__} inside {type(model).__name__}" if inner is not model else ""
    if is_sharded(inner):
        return (meta_shadow(inner), to_meta(args), to_meta(kwargs),
                "sharded parameters (DTensor): analysed a meta-device shadow with the full shapes")
    return inner, args, kwargs, note
