"""Canonical names and arguments of fx nodes, so that one rule covers every spelling of an op.

`F.linear`, `torch._C._nn.linear` and `aten.linear.default` all become "linear";
`operator.truediv` becomes "div"; an in-place `add_` becomes "add"; a call of an opaque
parameter-free torch.nn layer (`nn.GELU()`) becomes its functional op ("gelu").
"""
from __future__ import annotations

import math
import operator
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from ..core.registry import Registry

ALIASES: Registry[str, str] = Registry("op alias")
ALIASES.update({
    "truediv": "div", "itruediv": "div", "floordiv": "floor_divide", "iadd": "add",
    "isub": "sub", "imul": "mul", "matmul": "matmul", "__and__": "and", "__or__": "or",
    "and_": "and", "or_": "or", "pos": "identity", "_to_copy": "to",
    "_unsafe_view": "view", "_softmax": "softmax", "_log_softmax": "log_softmax",
    "native_layer_norm": "layer_norm", "native_group_norm": "group_norm",
    "native_batch_norm": "batch_norm", "_native_batch_norm_legit": "batch_norm",
    "_native_batch_norm_legit_functional": "batch_norm",
    "_native_batch_norm_legit_no_training": "batch_norm", "cudnn_batch_norm": "batch_norm",
    "native_dropout": "dropout", "feature_dropout": "dropout", "alpha_dropout": "dropout",
    "convolution": "convolution", "_convolution": "convolution",
    "constant_pad_nd": "pad", "linalg_vector_norm": "norm", "fused_rms_norm": "rms_norm",
    "_fused_rms_norm": "rms_norm", "_grouped_mm": "grouped_mm", "grouped_mm_fallback": "grouped_mm",
    "_scaled_dot_product_flash_attention": "scaled_dot_product_attention",
    "_scaled_dot_product_efficient_attention": "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu": "scaled_dot_product_attention",
    "lift_fresh_copy": "alias", "mT": "t", "mH": "t", "adjoint": "t", "numpy_mT": "t",
    "view_as": "view", "reshape_as": "reshape",
})
#: Parameter-free torch.nn layers, by class name, and the functional op each one calls: when
#: the tracer keeps torch.nn layers opaque, their calls still get the functional op's rule.
#: Layers whose slope depends on a constructor argument (LeakyReLU, ELU) are left out: their
#: calls stay "module:…" and are reported as assumed, rather than guessed.
NN_MODULE_OPS: Registry[str, str] = Registry("parameter-free torch.nn layer")
NN_MODULE_OPS.update({
    "ReLU": "relu", "ReLU6": "relu6", "GELU": "gelu", "SiLU": "silu", "Sigmoid": "sigmoid",
    "Tanh": "tanh", "Hardtanh": "hardtanh", "SELU": "selu", "CELU": "celu",
    "Softplus": "softplus", "Identity": "identity",
    "Dropout": "dropout", "Dropout1d": "dropout", "Dropout2d": "dropout", "Dropout3d": "dropout",
    "AlphaDropout": "dropout", "Flatten": "flatten", "Unflatten": "unflatten",
    "Softmax": "softmax", "LogSoftmax": "log_softmax",
    "MaxPool1d": "max_pool1d", "MaxPool2d": "max_pool2d", "MaxPool3d": "max_pool3d",
    "AvgPool1d": "avg_pool1d", "AvgPool2d": "avg_pool2d", "AvgPool3d": "avg_pool3d",
    "AdaptiveAvgPool1d": "adaptive_avg_pool1d", "AdaptiveAvgPool2d": "adaptive_avg_pool2d",
    "AdaptiveAvgPool3d": "adaptive_avg_pool3d", "AdaptiveMaxPool1d": "adaptive_max_pool1d",
    "AdaptiveMaxPool2d": "adaptive_max_pool2d",
})
#: Tensor attributes that are ops (`W.T`, `W.mT`): symbolic_trace records them as getattr.
_ATTRIBUTE_OPS = {"T": "numpy_T", "H": "numpy_T", "mT": "t", "mH": "t"}


def _strip(name: str) -> str:
    if name.endswith("_") and not name.startswith("__"):
        name = name.rstrip("_")
    return ALIASES.get(name, name)


def op_name(node: fx.Node, modules: dict[str, torch.nn.Module] | None = None) -> str:
    """Canonical op name of a node ("module:ClassName" for a leaf-module call)."""
    if node.op == "call_function":
        t = node.target
        if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            schema_name = t._schema.name if isinstance(t, torch._ops.OpOverload) else t._qualified_op_name
            return _strip(schema_name.split("::")[-1])
        if t is operator.getitem:
            return "getitem"
        if t is getattr and len(node.args) == 2 and node.args[1] in _ATTRIBUTE_OPS:
            return _ATTRIBUTE_OPS[node.args[1]]
        return _strip(getattr(t, "__name__", str(t)))
    if node.op == "call_method":
        return _strip(str(node.target))
    if node.op == "call_module":
        mod = (modules or {}).get(str(node.target))
        if mod is None:
            return f"module:{node.target}"
        cls = type(mod)
        if cls.__module__.startswith("torch.nn.") and cls.__name__ in NN_MODULE_OPS:
            return NN_MODULE_OPS[cls.__name__]
        return f"module:{cls.__name__}"
    return node.op


def arguments(node: fx.Node) -> dict[Any, Any]:
    """Arguments by name where torch knows the signature, else by position (0, 1, …)."""
    cached = node.meta.get("_normgraph_args")
    if cached is not None:
        return cached
    named = None
    if node.op == "call_function" and node.target is not operator.getitem:
        try:
            pair = normalize_function(node.target, tuple(node.args), dict(node.kwargs),
                                      normalize_to_only_use_kwargs=True)
            named = dict(pair.kwargs) if pair is not None else None
        except Exception:  # noqa: BLE001 - some builtins have ambiguous overloads
            named = None
    if named is None:
        named = {i: a for i, a in enumerate(node.args)}
        named.update(node.kwargs)
    node.meta["_normgraph_args"] = named
    return named


def arg(args: dict[Any, Any], name: str, index: int, default: Any = None) -> Any:
    """Fetch an argument by its schema name, or by position when names are unknown."""
    if name in args:
        return args[name]
    return args.get(index, default)


def key_of(args: dict[Any, Any], target: fx.Node) -> Any:
    """The argument name/position under which `target` appears (top level or inside a list)."""
    for k, v in args.items():
        if v is target:
            return k
        if isinstance(v, (list, tuple)) and any(x is target for x in v):
            return k
    return None


def tensor_inputs(node: fx.Node) -> Iterator[tuple[Any, fx.Node]]:
    """(argument key, input node) for every node input, lists flattened (cat's tensors)."""
    for i, a in enumerate(node.args):
        yield from _walk(i, a)
    for k, a in node.kwargs.items():
        yield from _walk(k, a)


def _walk(key: Any, a: Any) -> Iterator[tuple[Any, fx.Node]]:
    if isinstance(a, fx.Node):
        yield key, a
    elif isinstance(a, (list, tuple)):
        for x in a:
            yield from _walk(key, x)
    elif isinstance(a, dict):
        for x in a.values():
            yield from _walk(key, x)


def shape_of(node: Any) -> tuple[int, ...] | None:
    """Static shape of a node's value when the front end recorded one (torch.export does)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except (TypeError, ValueError):
            return None
    return None


def reduction_size(node: fx.Node) -> float:
    """How many entries each output entry of a reduction gathers: numel in / numel out from
    the traced shapes (1 when either is unknown)."""
    src = node.args[0] if node.args else None
    a, b = shape_of(src), shape_of(node)
    if a is None or b is None:
        return 1.0
    n_in, n_out = math.prod(a), math.prod(b)
    return n_in / n_out if n_out > 0 and n_in >= n_out else 1.0
