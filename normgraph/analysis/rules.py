"""The rule tables: which atom a parameter is, and how sensitive each op is to each input.

The tables are registries (`core.registry.Registry`) keyed by canonical op name (see
`ops.op_name`) or module class: `PARAM_FLOW`, `ATOM_RULES`, `BOND_RULES`, `MODULE_RULES`.
Users extend them with `register_atom_rule`, `register_bond_rule`, `register_module_rule`,
or everything about one op at once with `normgraph.register_op` (docs/custom_rules.md).
The scale-mode facts of an op live in `scale.py`. The reasons for every entry are in
docs/norms.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
import torch.fx as fx

from ..core.layout import matrix_options, part_options
from ..core.registry import Registry
from . import ops

# ---------------------------------------------------------------------------------------
# Atoms


@dataclass
class AtomSpec:
    """What a rule says about one use of a parameter."""

    kind: str
    fan_in: int | None = None
    fan_out: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class Use:
    """One op that consumes a parameter, after the parameter went through pure data movement."""

    node: fx.Node            # the consuming op
    op: str                  # its canonical name
    key: Any                 # argument name/position the parameter enters at
    args: dict[Any, Any]     # the op's arguments by name (or position)
    shape: tuple[int, ...]   # the parameter's own shape
    transposed: bool = False  # the parameter reached the op with its last two dims swapped
    indexed: bool = False     # the op saw one slice of a stacked (expert) parameter
    conv_mode: str = "positional"
    split_packed: bool = True


AtomRule = Callable[[Use], Union[AtomSpec, None]]

#: How a parameter may flow through an op before its real consumer, so a rule sees the
#: parameter itself: "passthrough" (unchanged in meaning: casts, views, dropout),
#: "transpose" (last two dims swapped), "index" (one slice of a stacked parameter), or
#: "metadata" (the op reads only dtype/shape: not a use at all).
PARAM_FLOW: Registry[str, str] = Registry(
    "parameter flow", check=lambda op, how: _check_flow(op, how))
FLOWS = ("passthrough", "transpose", "index", "metadata")


def _check_flow(op: str, how: str) -> None:
    if how not in FLOWS:
        raise ValueError(f"parameter flow of {op!r} must be one of {FLOWS}, got {how!r}")


for _flow, _ops in {
    "passthrough": ("to", "type", "type_as", "float", "half", "bfloat16", "contiguous", "clone", "detach",
                    "alias", "identity", "dropout", "view", "reshape", "flatten", "expand", "unsqueeze",
                    "squeeze", "expand_as"),
    "transpose": ("t", "numpy_T", "transpose", "permute", "swapaxes", "movedim"),
    "index": ("getitem", "select", "index", "slice", "narrow", "index_select"),
    "metadata": ("_assert_tensor_metadata", "_assert_scalar", "size", "sym_size", "sym_numel",
                 "dim", "numel", "getattr"),
}.items():
    for _op in _ops:
        PARAM_FLOW.register(_op, _flow)

ATOM_RULES: Registry[str, AtomRule] = Registry("atom rule")


def register_atom_rule(op: str, rule: AtomRule) -> None:
    """Classify parameters consumed by canonical op `op`: `rule(use) -> AtomSpec | None`."""
    ATOM_RULES.register(op, rule)


def _output_users(out_node: fx.Node, fan_out: int):
    """(user, canonical name, arguments) of a matrix op's output, looking through views that
    keep its last dim (a few steps: the split of a packed projection is close by)."""
    frontier, steps = [out_node], 0
    while frontier and steps < 8:
        node = frontier.pop()
        steps += 1
        for user in node.users:
            name, a = ops.op_name(user), ops.arguments(user)
            if name in ("view", "reshape") and _last_dim(user) == fan_out:
                frontier.append(user)
            else:
                yield user, name, a


def _splits(out_node: fx.Node, fan_out: int) -> int:
    """Equal chunks a matrix op's output is split into along its last dim (packed QKV)."""
    for user, name, a in _output_users(out_node, fan_out):
        n = _equal_chunks(user, name, a, fan_out)
        if n > 1:
            return n
    return 1


def _unequal_parts(out_node: fx.Node, fan_out: int) -> list[int] | None:
    """Sizes of unequal chunks a matrix op's output is split into along its last dim (a fused
    q/k/v projection with fewer k/v heads: [64, 16, 16]); None when there are none."""
    for user, name, a in _output_users(out_node, fan_out):
        if name not in ("split", "split_with_sizes") or not _is_last(user, ops.arg(a, "dim", 2, 0)):
            continue
        size = a.get("split_size", a.get("split_size_or_sections", a.get("split_sizes", a.get(1))))
        if (isinstance(size, (list, tuple)) and len(set(size)) > 1 and all(isinstance(n, int) for n in size)
                and sum(size) == fan_out):
            return [int(n) for n in size]
    return None


def _equal_chunks(user: fx.Node, name: str, a: dict[Any, Any], fan_out: int) -> int:
    if name == "unflatten":
        dim, sizes = ops.arg(a, "dim", 1), ops.arg(a, "sizes", 2)
        if _is_last(user, dim) and isinstance(sizes, (list, tuple)) and len(sizes) == 2:
            n = sizes[0]
            return n if isinstance(n, int) and n > 0 and fan_out % n == 0 else 1
        return 1
    if name not in ("split", "split_with_sizes", "chunk"):
        return 1
    if not _is_last(user, ops.arg(a, "dim", 2, 0)):
        return 1
    if name == "chunk":
        n = ops.arg(a, "chunks", 1)
        return n if isinstance(n, int) and n > 0 and fan_out % n == 0 else 1
    size = a.get("split_size", a.get("split_size_or_sections", a.get("split_sizes", a.get(1))))
    if isinstance(size, int) and size > 0 and fan_out % size == 0:
        return fan_out // size
    if isinstance(size, (list, tuple)) and size and len(set(size)) == 1:
        return len(size)
    return 1


def _last_dim(node: fx.Node) -> int | None:
    shape = ops.shape_of(node)
    return shape[-1] if shape else None


def _is_last(node: fx.Node, dim: Any) -> bool:
    if dim == -1:
        return True
    src = node.args[0] if node.args else None
    shape = ops.shape_of(src)
    return isinstance(dim, int) and shape is not None and dim == len(shape) - 1


def matrix_spec(use: Use, layout: str, kind: str | None = None) -> AtomSpec:
    """Atom for a weight the op sees as (out, in) (`layout="out_in"`) or as (in, out)."""
    if use.transposed:
        layout = "in_out" if layout == "out_in" else "out_in"
    shape = use.shape
    if len(shape) == 1:
        return AtomSpec("gain", note=f"1-D operand of {use.op}")
    if len(shape) > 3:
        return AtomSpec("fallback", note=f"{len(shape)}-D parameter in {use.op}")
    lead = list(shape[:-2])
    rows, cols = (shape[-2], shape[-1]) if layout == "out_in" else (shape[-1], shape[-2])
    if kind is None:
        stacked_op = use.op in ("bmm", "grouped_mm", "baddbmm", "matmul")
        kind = "expert" if lead and (use.indexed or stacked_op) else "linear"
    sizes = _unequal_parts(use.node, rows) if use.split_packed and not lead else None
    if sizes is not None:
        return _parted_spec(use, kind or "linear", layout, rows, cols, sizes)
    s = _splits(use.node, rows) if use.split_packed else 1
    n = len(lead)
    batch = math.prod(lead) * s
    if layout == "out_in":
        opts = matrix_options(lead + [s, rows // s, cols], list(range(n + 3)), batch, rows // s, cols)
    else:
        opts = matrix_options(lead + [cols, s, rows // s], list(range(n)) + [n + 1, n + 2, n],
                              batch, rows // s, cols)
    note = f"{use.op} weight, {'(in, out)' if layout == 'in_out' else '(out, in)'} layout"
    if lead and kind == "linear":
        note += f", {math.prod(lead)} stacked matrices"
    if s > 1:
        note += f", packed ×{s}"
    return AtomSpec(kind, fan_in=cols, fan_out=rows // s, options=opts, note=note)


def _parted_spec(use: Use, kind: str, layout: str, rows: int, cols: int, sizes: list[int]) -> AtomSpec:
    """A 2-D weight whose output is split into unequal parts: each part its own matrix."""
    parts, start = [], 0
    for n in sizes:
        if layout == "out_in":  # the tensor is (rows, cols): part = rows [start, start + n)
            parts.append((start, n, matrix_options([n, cols], [0, 1], 1, n, cols)))
        else:                   # the tensor is (cols, rows): part = columns [start, start + n)
            parts.append((start, n, matrix_options([cols, n], [1, 0], 1, n, cols)))
        start += n
    opts = part_options(parts, dim=0 if layout == "out_in" else 1)
    layout_note = "(in, out)" if layout == "in_out" else "(out, in)"
    return AtomSpec(kind, fan_in=cols, fan_out=rows, options=opts,
                    note=f"{use.op} weight, {layout_note} layout, packed in unequal parts "
                         f"{' + '.join(map(str, sizes))}")


def _linear(use: Use) -> AtomSpec | None:
    if use.key in ("weight", 1):
        return matrix_spec(use, "out_in")
    if use.key in ("bias", 2):
        return AtomSpec("bias", note="linear bias")
    return None


def _matmul(use: Use) -> AtomSpec | None:
    if use.key in ("other", "mat2", 1):
        return matrix_spec(use, "in_out")
    if use.op == "addmm" and use.key in ("input", "self", 0):
        return AtomSpec("bias", note="addmm bias")
    if use.key in ("input", "self", "mat1", 0):
        return matrix_spec(use, "out_in")  # W @ x
    return None


def _grouped_mm(use: Use) -> AtomSpec | None:
    if use.key in ("mat_b", "other", "weight", 1):
        return matrix_spec(use, "in_out", kind="expert")
    return None


def _embedding(use: Use) -> AtomSpec | None:
    if use.key == "weight":
        return AtomSpec("embedding", fan_in=use.shape[0], fan_out=math.prod(use.shape[1:]),
                        note="embedding table")
    return None


def conv_spec(use: Use, transposed_conv: bool) -> AtomSpec:
    """A conv kernel as g·K matrices (per group and kernel position), or g flattened ones."""
    groups = ops.arg(use.args, "groups", 8 if use.op == "convolution" else 6, 1) or 1
    if use.op == "convolution":
        transposed_conv = bool(ops.arg(use.args, "transposed", 6, False))
    shape = use.shape
    k = math.prod(shape[2:])
    a, b = shape[0], shape[1]  # (out, in/g), or for a transposed conv (in, out/g)
    in_g, out_g = (a // groups, b) if transposed_conv else (b, a // groups)
    if use.conv_mode == "flatten":
        if transposed_conv:
            opts = matrix_options([groups, in_g, out_g, k], [0, 2, 1, 3], groups, out_g, in_g * k)
        else:
            opts = matrix_options([groups, out_g, in_g * k], [0, 1, 2], groups, out_g, in_g * k)
        return AtomSpec("conv", fan_in=in_g * k, fan_out=out_g, options=opts,
                        note=f"conv kernel, flattened, groups={groups}")
    if transposed_conv:
        opts = matrix_options([groups, in_g, out_g, k], [0, 3, 2, 1], groups * k, out_g, in_g, norm_scale=k)
    else:
        opts = matrix_options([groups, out_g, in_g, k], [0, 3, 1, 2], groups * k, out_g, in_g, norm_scale=k)
    grouping = "depthwise" if in_g == 1 and groups > 1 else (f"groups={groups}" if groups > 1 else "dense")
    return AtomSpec("conv", fan_in=in_g, fan_out=out_g, options=opts,
                    note=f"{'transposed ' if transposed_conv else ''}conv kernel, {k} positions, {grouping}")


def _conv(use: Use) -> AtomSpec | None:
    if use.key in ("weight", 1):
        return conv_spec(use, transposed_conv=use.op.startswith("conv_transpose"))
    if use.key in ("bias", 2):
        return AtomSpec("bias", note="conv bias")
    return None


def _norm_affine(use: Use) -> AtomSpec | None:
    if use.key == "weight":
        return AtomSpec("gain", note=f"{use.op} gain")
    if use.key == "bias":
        return AtomSpec("bias", note=f"{use.op} bias")
    return None


def _additive(use: Use) -> AtomSpec | None:
    if use.indexed and len(use.shape) == 2:
        return AtomSpec("embedding", fan_in=use.shape[0], fan_out=use.shape[1],
                        note=f"table read by indexing or slicing, added to an activation ({use.op})")
    return AtomSpec("bias", note=f"added to an activation ({use.op})")


def _weight_normalised(use: Use) -> AtomSpec | None:
    """`_weight_norm(v, g, dim)`: v flows on to the conv/linear (a passthrough), g is a gain."""
    if use.key in ("g", 1):
        return AtomSpec("gain", note="weight-norm magnitude g")
    return None


def _multiplicative(use: Use) -> AtomSpec | None:
    if use.op == "div" and use.key in ("other", 1):
        return None  # dividing by a parameter: no rule
    return AtomSpec("gain", note=f"multiplied elementwise ({use.op})")


def _concatenated(use: Use) -> AtomSpec | None:
    return AtomSpec("bias", note="learned token concatenated to the activations (cat)")


register_atom_rule("linear", _linear)
for _op in ("matmul", "mm", "bmm", "addmm", "baddbmm"):
    register_atom_rule(_op, _matmul)
register_atom_rule("grouped_mm", _grouped_mm)
register_atom_rule("embedding", _embedding)
for _op in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
            "conv_transpose3d", "convolution"):
    register_atom_rule(_op, _conv)
for _op in ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"):
    register_atom_rule(_op, _norm_affine)
for _op in ("add", "sub", "rsub"):
    register_atom_rule(_op, _additive)
for _op in ("mul", "div"):
    register_atom_rule(_op, _multiplicative)
for _op in ("cat", "concat", "concatenate"):
    register_atom_rule(_op, _concatenated)
register_atom_rule("_weight_norm", _weight_normalised)

# ---------------------------------------------------------------------------------------
# Bonds: sensitivity of an op's output to each of its inputs


@dataclass
class BondInput:
    """One input of one op, as a bond rule sees it."""

    node: fx.Node     # the op
    op: str
    key: Any          # argument name/position of the input
    args: dict[Any, Any]
    input: fx.Node


#: A number, or a function of the input returning a number, or None for "no bound known
#: here" (then the op gets 1 and is listed as assumed, as an op without a rule is).
BondRule = Union[float, Callable[[BondInput], Union[float, None]]]
BOND_RULES: Registry[str, BondRule] = Registry("bond rule")


def register_bond_rule(op: str, rule: BondRule) -> None:
    """Sensitivity of canonical op `op` to each input: a number, or a function of a `BondInput`."""
    BOND_RULES.register(op, rule)


def _scale(b: BondInput) -> float:
    """mul: |c| when the other operand is a number c, else 1 (a gain or a well-normed operand)."""
    numbers = [v for k, v in b.args.items()
               if v is not b.input and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return abs(float(numbers[0])) if numbers else 1.0


def _divide(b: BondInput) -> float:
    """div: 1/|c| for a number divisor; a tensor divisor is a normalisation statistic (0)."""
    divisor = ops.arg(b.args, "other", 1)
    if b.input is divisor:
        return 0.0
    if isinstance(divisor, (int, float)) and not isinstance(divisor, bool) and divisor != 0:
        return 1.0 / abs(float(divisor))
    return 1.0


def _pow(b: BondInput) -> float:
    """x**p: its slope p·|x|^(p−1) at |x| = 1, i.e. |p|."""
    p = ops.arg(b.args, "exponent", 1, 1.0)
    return abs(float(p)) if isinstance(p, (int, float)) else 1.0


def _leaky(b: BondInput) -> float:
    slope = ops.arg(b.args, "negative_slope", 1, 0.01)
    return max(1.0, abs(float(slope))) if isinstance(slope, (int, float)) else 1.0


def _elu(b: BondInput) -> float:
    """elu: slope 1 for x > 0 and α·eˣ → α just below 0, so max(1, |α|)."""
    alpha = ops.arg(b.args, "alpha", 1, 1.0)
    return max(1.0, abs(float(alpha))) if isinstance(alpha, (int, float)) else 1.0


#: selu(x) = λ·x (x > 0), λα·(eˣ − 1) (x ≤ 0): its largest slope is λα just below 0.
SELU_SLOPE = 1.0507009873554805 * 1.6732632423543772


def _traced(b: BondInput) -> tuple[tuple[int, ...] | None, bool]:
    """(shape, integer?) of the input as the tracer recorded it; (None, False) if unknown."""
    val = b.input.meta.get("val")
    dtype = getattr(val, "dtype", None)
    integer = dtype is not None and not (dtype.is_floating_point or dtype.is_complex)
    shape = getattr(val, "shape", None)
    return (tuple(int(s) for s in shape) if shape is not None else None), integer


def _cumulative_sum(b: BondInput) -> float | None:
    """cumsum over n entries: the RMS→RMS norm (σ_max) of the n×n lower-triangular ones
    matrix, 1 / (2·sin(π / (4n + 2))) ≈ (2n + 1)/π; 0 on integer data (position ids from a
    mask); None (assumed) when the tracer recorded no shape."""
    shape, integer = _traced(b)
    if integer:
        return 0.0
    dim = ops.arg(b.args, "dim", 1)
    if shape is None or not isinstance(dim, int):
        return None
    n = shape[dim] if shape else 1
    return 1.0 / (2.0 * math.sin(math.pi / (4 * n + 2)))


def _first_difference(b: BondInput) -> float | None:
    """diff (n = 1): x[i+1] − x[i], n → n−1 entries; σ_max ≤ 2 and RMS→RMS adds √(n/(n−1)).
    0 on integer data; None (assumed) when the tracer recorded no shape or n > 1."""
    shape, integer = _traced(b)
    if integer:
        return 0.0
    order, dim = ops.arg(b.args, "n", 1, 1), ops.arg(b.args, "dim", 2, -1)
    if shape is None or order != 1 or not isinstance(dim, int) or shape[dim] < 2:
        return None
    n = shape[dim]
    return 2.0 * math.cos(math.pi / (2 * n)) * math.sqrt(n / (n - 1))


def _summed(b: BondInput) -> float | None:
    """sum over n entries per output entry: |Σ xᵢ| ≤ n·RMS(x), so n (numel in / numel out,
    from traced shapes); None (assumed) without them."""
    if ops.shape_of(b.input) is None or ops.shape_of(b.node) is None:
        return None
    return ops.reduction_size(b.node)


def data_inputs(*names: Any) -> Callable[[BondInput], float]:
    """1 for the inputs named (the data), 0 for the rest (masks, indices, statistics, weights)."""
    def rule(b: BondInput) -> float:
        return 1.0 if b.key in names else 0.0
    rule.__doc__ = f"1 for {names}, 0 for the other inputs"
    return rule


for _op in ("add", "sub", "rsub", "neg", "relu", "relu6", "abs", "dropout", "identity", "tanh",
            "hardtanh", "celu", "softplus", "clamp", "clamp_min", "clamp_max",
            "maximum", "minimum", "max_pool1d", "max_pool2d", "max_pool3d",
            "max_pool2d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d",
            "view", "reshape", "permute", "transpose", "t", "numpy_T", "getitem", "split",
            "split_with_sizes", "chunk", "unbind", "cat", "concat", "stack", "flatten", "unflatten",
            "pad", "expand", "contiguous", "clone", "type", "float", "half",
            "bfloat16", "detach", "squeeze", "unsqueeze", "slice", "select", "narrow", "repeat",
            "roll", "alias", "movedim", "swapaxes", "mean", "upsample_nearest1d", "upsample_nearest2d",
            "upsample_nearest3d", "upsample_bilinear2d", "upsample_linear1d", "upsample_trilinear3d",
            "upsample_bicubic2d", "interpolate", "_upsample_nearest_exact2d", "pixel_shuffle", "avg_pool1d", "avg_pool2d",
            "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
            "softmax", "log_softmax", "sort", "topk", "output", "matmul", "mm", "bmm", "baddbmm",
            "addmm", "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
            "conv_transpose2d", "conv_transpose3d", "convolution"):
    register_bond_rule(_op, 1.0)
for _op in ("to", "type_as", "expand_as", "view", "reshape"):
    # the second argument (`x.type_as(w)`, `x.expand_as(y)`, `x.to(other)`, a size list)
    # carries only a dtype, device or shape: no path for a change
    register_bond_rule(_op, data_inputs("self", "input", 0))
register_bond_rule("gelu", 1.1289)
register_bond_rule("silu", 1.0998)
register_bond_rule("sigmoid", 0.25)
register_bond_rule("mul", _scale)
register_bond_rule("div", _divide)
register_bond_rule("pow", _pow)
register_bond_rule("square", 2.0)  # = pow(x, 2) at |x| = 1
register_bond_rule("leaky_relu", _leaky)
register_bond_rule("elu", _elu)
register_bond_rule("selu", SELU_SLOPE)
register_bond_rule("cumsum", _cumulative_sum)
register_bond_rule("sum", _summed)
register_bond_rule("_weight_norm", 0.0)  # builds a weight from v and g: the atoms count at the conv
for _op in ("cross_entropy", "cross_entropy_loss", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
            "binary_cross_entropy_with_logits", "kl_div"):
    register_bond_rule(_op, data_inputs("input", "self", 0))  # 1 to the prediction, 0 to targets
register_bond_rule("diff", _first_difference)
for _op in ("rsqrt", "sqrt", "var", "std", "var_mean", "norm", "reciprocal"):
    register_bond_rule(_op, 0.0)  # normalisation statistics: see docs/norms.md
for _op in ("eq", "ne", "lt", "le", "gt", "ge", "and", "or", "logical_and", "logical_or",
            "logical_not", "bitwise_and", "bitwise_or", "bitwise_not", "isnan", "isinf",
            "argmax", "argmin", "argsort", "histc", "floor_divide", "remainder",
            "_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_numel", "arange",
            "ones_like", "zeros_like", "full_like", "empty_like", "new_ones", "new_zeros",
            "new_empty", "new_full", "new_tensor", "scalar_tensor", "sym_constrain_range_for_size",
            "size", "dim"):
    register_bond_rule(_op, 0.0)  # integer/boolean results: no path for a weight change
for _op in ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"):
    register_bond_rule(_op, data_inputs("input", 0))
register_bond_rule("scaled_dot_product_attention",
                   data_inputs("query", "key", "value", "attn_mask", 0, 1, 2, 3))
register_bond_rule("embedding", 0.0)
for _op in ("index", "index_select", "gather", "masked_fill"):
    register_bond_rule(_op, data_inputs("self", "input", 0))
register_bond_rule("where", data_inputs("self", "other", "input", 1, 2))
register_bond_rule("index_put", data_inputs("self", "values", 0, 2))
register_bond_rule("grouped_mm", data_inputs("self", "mat_a", "input", 0, "mat_b", "weight", 1))


def bond_sensitivity(b: BondInput) -> tuple[float, bool]:
    """(sensitivity, assumed?) of op `b.op` to input `b.input`."""
    rule = BOND_RULES.get(b.op)
    value = rule(b) if callable(rule) else rule
    if value is None:
        return 1.0, True
    return float(value), False


# ---------------------------------------------------------------------------------------
# Modules: rules for opaque (leaf) modules and for the module-level fallback

ModuleRule = Callable[[torch.nn.Module, str], dict[str, AtomSpec]]


@dataclass
class ModuleEntry:
    rule: ModuleRule
    leaf: bool = False          # keep the module opaque while tracing
    sensitivity: float = 1.0    # of the module's output to each input (when opaque)


MODULE_RULES: Registry[type, ModuleEntry] = Registry("module rule")
MODULE_RULES_BY_NAME: Registry[str, ModuleEntry] = Registry("module rule (by class name)")


def register_module_rule(cls: type | str, rule: ModuleRule, *, leaf: bool = False,
                         sensitivity: float = 1.0) -> None:
    """Atoms of a module's parameters: `rule(module, conv_mode) -> {local_name: AtomSpec}`.

    `leaf=True` keeps the module opaque to `symbolic_trace` (one node, `sensitivity` per
    input); the rule is also what the module-level fallback uses when no graph can be
    captured. A class name (str) matches any class of that name (e.g. transformers' Conv1D).
    """
    entry = ModuleEntry(rule, leaf, sensitivity)
    if isinstance(cls, str):
        MODULE_RULES_BY_NAME.register(cls, entry)
    else:
        MODULE_RULES.register(cls, entry)


def module_entry(mod: torch.nn.Module) -> ModuleEntry | None:
    """The most specific rule for `mod`'s class (by class, then by class name)."""
    for cls in type(mod).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
        if cls.__name__ in MODULE_RULES_BY_NAME:
            return MODULE_RULES_BY_NAME[cls.__name__]
    return None


def detached_use(mod: torch.nn.Module, name: str, op: str, key: Any, conv_mode: str,
                 args: dict | None = None) -> Use:
    """A use with no graph around it (module-level rules): no packed-split detection."""
    node = fx.Graph().placeholder("x")
    return Use(node, op, key, args or {}, tuple(getattr(mod, name).shape), conv_mode=conv_mode)


def _module_linear(mod: torch.nn.Module, conv_mode: str) -> dict[str, AtomSpec]:
    out = {"weight": matrix_spec(detached_use(mod, "weight", "linear", "weight", conv_mode), "out_in")}
    if getattr(mod, "bias", None) is not None:
        out["bias"] = AtomSpec("bias", note="linear bias")
    return out


def _module_conv1d_hf(mod: torch.nn.Module, conv_mode: str) -> dict[str, AtomSpec]:
    out = {"weight": matrix_spec(detached_use(mod, "weight", "addmm", "mat2", conv_mode), "in_out")}
    if getattr(mod, "bias", None) is not None:
        out["bias"] = AtomSpec("bias", note="linear bias")
    return out


def _module_embedding(mod: torch.nn.Module, conv_mode: str) -> dict[str, AtomSpec]:
    w = mod.weight
    return {"weight": AtomSpec("embedding", fan_in=w.shape[0], fan_out=w.shape[1], note="embedding table")}


def _module_conv(mod: torch.nn.Module, conv_mode: str) -> dict[str, AtomSpec]:
    transposed = isinstance(mod, torch.nn.modules.conv._ConvTransposeNd)
    use = detached_use(mod, "weight", "conv_transpose2d" if transposed else "conv2d", "weight",
                       conv_mode, {"groups": mod.groups})
    out = {"weight": conv_spec(use, transposed)}
    if mod.bias is not None:
        out["bias"] = AtomSpec("bias", note="conv bias")
    return out


def _module_norm(mod: torch.nn.Module, conv_mode: str) -> dict[str, AtomSpec]:
    out = {}
    if getattr(mod, "weight", None) is not None:
        out["weight"] = AtomSpec("gain", note=f"{type(mod).__name__} gain")
    if getattr(mod, "bias", None) is not None:
        out["bias"] = AtomSpec("bias", note=f"{type(mod).__name__} bias")
    return out


def _module_mha(mod: torch.nn.Module, conv_mode: str) -> dict[str, AtomSpec]:
    out: dict[str, AtomSpec] = {}
    e = mod.embed_dim
    if mod.in_proj_weight is not None:
        out["in_proj_weight"] = AtomSpec("linear", fan_in=e, fan_out=e,
                                         options=matrix_options([3, e, e], [0, 1, 2], 3, e, e),
                                         note="packed in-projection ×3")
    else:
        for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            out[n] = matrix_spec(detached_use(mod, n, "linear", "weight", conv_mode), "out_in")
    if mod.in_proj_bias is not None:
        out["in_proj_bias"] = AtomSpec("bias", note="packed in-projection bias")
    for n in ("bias_k", "bias_v"):
        if getattr(mod, n, None) is not None:
            out[n] = AtomSpec("bias", note="attention key/value bias token")
    for n, spec in _module_linear(mod.out_proj, conv_mode).items():
        out[f"out_proj.{n}"] = spec
    return out


register_module_rule(torch.nn.Linear, _module_linear)
register_module_rule("Conv1D", _module_conv1d_hf)
register_module_rule(torch.nn.Embedding, _module_embedding)
register_module_rule(torch.nn.EmbeddingBag, _module_embedding)
register_module_rule(torch.nn.modules.conv._ConvNd, _module_conv)
for _cls in (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase,
             torch.nn.RMSNorm):
    register_module_rule(_cls, _module_norm)
register_module_rule(torch.nn.MultiheadAttention, _module_mha, leaf=True)
