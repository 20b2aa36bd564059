"""The scale-reading sensitivity modes ("hybrid", the default; "scale"; "typical"): modula's
algebra read in the units the network uses.

modula's algebra assumes every module is *well-normed*: its output has norm ≤ 1 when its
input does. `(1 − 1/L)·x + f(x)/L` keeps that promise; the plain `x + f(x)` of GPT-2,
Llama and BERT does not, so a worst-case path sum that treats every activation as unit-
sized doubles at each block and freezes the early layers (budgets 1e-14 … 1e-2).

The "scale" mode keeps the worst-case path sum and changes one assumption: each activation has
a *scale* S(v), an upper bound on its RMS propagated forward through the graph from
well-normed atoms (a weight, a gain or an embedding row has norm 1, so a linear map keeps
its input's scale and an embedding lookup has scale 1):

* `a + b` has scale S(a) + S(b) (a residual stream grows by the branch's scale per block);
* a normalisation (LayerNorm, RMSNorm, `x·rsqrt(mean(x²))`, `x / ‖x‖`) outputs scale 1 and
  has sensitivity S(out)/S(in) to its input: it undoes the growth it sees;
* a product of two activations (gating, `q @ kᵀ`) has sensitivity S(other operand) to each.

Downstream D is then an honest bound in the network's own units, and an atom's
`downstream` is D(its op's output) × the scale of what it multiplies (its op's input),
so budget = mass share / downstream sizes each step by the change it makes where its
output lands. On modula-shaped networks every scale is 1 and this mode agrees with
`sensitivity="modula"`; the derivation and the measurements that chose it are in
docs/concepts.md.

With `p = 2` (`sensitivity="typical"`) the same rules run with sums of scales and sums over
paths taken in quadrature, √(Σ xᵢ²), the size of a sum of uncorrelated terms, instead of
Σ xᵢ: the worst case assumes every path's effect lines up, the typical case that they
are independent. `sensitivity="hybrid"` (the default) chooses per combination
(`Scales.p_of_sum`, `p_of_uses`, `p_of_tied`): quadrature for plain sums (a residual stream
and what enters it), worst case for explicitly weighted sums (modula's convex residuals)
and for everything else (one activation read by several ops, a tied parameter's uses).

Everything here is data: `SCALE_RULES` (op → output scale) and `SCALED_BOND_RULES`
(op → sensitivity in this mode), extended with `register_scale_rule`. An op with no entry
keeps its modula bond rule and the largest scale among its live inputs.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx

from ..core.registry import Registry
from . import ops
from .patterns import PICKS, SPLITS, operand_factor
from .rules import BondInput, Use, bond_sensitivity

#: Output scale of an op: rule(node, args, S) with S(x) the scale of any argument.
ScaleRule = Callable[[fx.Node, dict, Callable[[Any], float]], float]
#: Sensitivity of an op to one input in this mode: rule(b, S) -> float, or None (assumed).
ScaledBondRule = Callable[[BondInput, Callable[[Any], float]], "float | None"]

SCALE_RULES: Registry[str, ScaleRule] = Registry("scale rule")
SCALED_BOND_RULES: Registry[str, ScaledBondRule] = Registry("scale-mode bond rule")

NORMALISATIONS = ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm")
#: Ops whose output is the sum of their inputs (the scale rule `_sum_of_inputs`).
SUMS = ("add", "sub", "rsub")
#: Ops through which a parameter acts as a matrix on an activation (a tied table's head use).
MATRIX_OPS = ("linear", "matmul", "mm", "addmm", "bmm", "einsum")
#: Products whose output's pieces are maps of their own (`Scales._part_of_product`).
_PRODUCTS = (*MATRIX_OPS, "conv1d", "conv2d", "conv3d", "convolution")


def register_scale_rule(op: str, *, scale: ScaleRule | None = None,
                        bond: ScaledBondRule | None = None) -> None:
    """How canonical op `op` scales its output (`scale`) and how sensitive it is to each input
    (`bond`) in the scale-reading modes. Either may be omitted (see the module docstring)."""
    if scale is not None:
        SCALE_RULES.register(op, scale)
    if bond is not None:
        SCALED_BOND_RULES.register(op, bond)


# ---------------------------------------------------------------------------------------
# Propagation


class Scales:
    """S(v) for every node of a captured graph, propagated forward once.

    Inputs that are floating-point data have scale 1, integer inputs (token ids) 0,
    trainable parameters 1 (well-normed), except biases, which shift rather than scale and
    count 0 in a sum; constants (buffers, masks, RoPE tables) are not activations: as
    factors they count their largest entry where the tensor is known (a stored `sqrt(d)`),
    else 1; as summands, 0.
    """

    def __init__(self, graph: fx.Graph, live: set[fx.Node], params: Mapping[fx.Node, str],
                 biases: set[str], modules: Mapping[str, Any],
                 rotations: Mapping[fx.Node, fx.Node] | None = None, p: float = 1.0,
                 values: Mapping[fx.Node, Any] | None = None, hybrid: bool = False,
                 table_multipliers: bool = True) -> None:
        self.live = live
        self.p = p
        self.hybrid = hybrid
        self.table_multipliers = hybrid and table_multipliers  # `_table_rows`
        self._values = values or {}
        #: constants whose values were needed but are on the meta device (read as 1)
        self.unknown: list[fx.Node] = []
        self.modules = modules
        self.value: dict[fx.Node, float] = {}
        self._roots: dict[fx.Node, int] = {}  # memo of `_root_bits`
        self._root_nodes: list[fx.Node] = []  # bit k of a root set ↔ _root_nodes[k]
        self._placeholder_roots = 0  # the bits of graph inputs
        self._part_roots: dict[tuple, int] = {}  # a fused product's pieces → their root bits
        #: values computed from parameters and constants only (`1 + w`, `w.float()`)
        self.weights: set[fx.Node] = set(params)
        rotations = rotations or {}
        self.rotations: Mapping[fx.Node, fx.Node] = rotations
        for node in graph.nodes:
            inputs = [i for i in node.all_input_nodes if i in live]
            if node not in params and inputs and all(i in self.weights for i in inputs):
                self.weights.add(node)
            if node in rotations:  # a rotation keeps its input's scale
                self.value[node] = self.value.get(rotations[node], 1.0)
            else:
                self.value[node] = self._compute(node, params, biases)

    def __call__(self, x: Any) -> float:
        """Scale of an argument: a node's scale, |c| for a number, 1 for anything else."""
        if isinstance(x, fx.Node):
            return self.value.get(x, 1.0)
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return abs(float(x))
        return 1.0

    def scaled_explicitly(self, node: fx.Node) -> bool:
        """`c·x` or `x / c` with c a number other than ±1 or a scalar weight: the network mixes
        this term into a sum with a weight of its own (modula's `(1 − 1/L)·x + f(x)/L`,
        modded-nanogpt's learned λ's), so the sum is a designed combination, not a plain
        accumulation of independent terms."""
        if ops.op_name(node, self.modules) not in ("mul", "div"):
            return False
        data = [v for v in node.args if isinstance(v, fx.Node) and v in self.live]
        if self.table_multipliers and len(data) == 1 and _table_rows(data[0], self):
            return False  # `table[ids] · √d`: the table's own multiplier (`_table_rows`), not a mixing weight
        for v in node.args:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(float(v)) != 1.0:
                return True
            if isinstance(v, fx.Node) and v in self.weights:
                val = v.meta.get("val", v.meta.get("example_value"))
                if getattr(val, "numel", lambda: 2)() == 1:
                    return True
        return False

    def p_of_sum(self, node: fx.Node) -> float:
        """The exponent that combines a sum's terms: `p`, but 1 in hybrid mode when some
        term is explicitly weighted (designed, worst-case weights sum to one)."""
        if self.hybrid and any(self.scaled_explicitly(i) for _, i in ops.tensor_inputs(node) if i in self.live):
            return 1.0
        return self.p

    def p_of_uses(self, node: fx.Node) -> float:
        """The exponent that combines the downstream of `node` over its uses: `p`; in hybrid
        mode 2 only where `node` enters a plain sum (a residual stream read by its next
        block and passed on), 1 everywhere else (q/k/v of one input, gates: worst case)."""
        if not self.hybrid:
            return self.p
        for u in node.users:
            if u in self.live and ops.op_name(u, self.modules) in SUMS and self.p_of_sum(u) != 1.0:
                return self.p
        return 1.0

    def p_of_tied(self) -> float:
        """How a tied parameter's uses combine: `p`; 1 in hybrid mode (one change of the
        parameter moves all its uses at once: they are aligned, not independent)."""
        return 1.0 if self.hybrid else self.p

    def roots(self, node: fx.Node) -> frozenset[fx.Node]:
        """The nearest ops above `node` (itself included) that read a weight, or the graph's
        inputs: where the signal `node` carries was last transformed by a parameter. Two
        activations with the same roots are functions of one activation (GELU written as
        `x·(1 + tanh(…))`); with disjoint roots they come from different maps (a gate)."""
        bits, found = self._root_bits(node), []
        while bits:
            low = bits & -bits
            found.append(self._root_nodes[low.bit_length() - 1])
            bits ^= low
        return frozenset(found)

    def _root_bits(self, node: fx.Node) -> int:
        """`roots(node)` as a bitset over `_root_nodes` (a residual stream's roots grow by one
        per block: as sets of nodes their unions were quadratic in the depth)."""
        memo = self._roots
        stack = [node]  # iterative post-order: a residual stream is a chain as deep as the model
        while stack:
            n = stack[-1]
            if n in memo:
                stack.pop()
                continue
            inputs = [i for i in n.all_input_nodes if i in self.live]
            part = self._part_of_product(n)
            if part is not None and part in self._part_roots:  # the same piece picked again
                memo[stack.pop()] = self._part_roots[part]
                continue
            if n.op == "placeholder" or any(i in self.weights for i in n.all_input_nodes) or not inputs \
                    or part is not None:
                memo[stack.pop()] = 1 << len(self._root_nodes)
                if n.op == "placeholder":
                    self._placeholder_roots |= memo[n]
                if part is not None:
                    self._part_roots[part] = memo[n]
                self._root_nodes.append(n)
                continue
            signal = [i for i in inputs if i not in self.weights]
            pending = [i for i in signal if i not in memo]
            if pending:
                stack.extend(pending)
                continue
            bits = 0
            for i in signal:
                bits |= memo[i]
            memo[stack.pop()] = bits
        return memo[node]

    def _part_of_product(self, n: fx.Node) -> tuple | None:
        """A piece picked out of one matrix product's output (`gate, up = (x W).chunk(2)`, a
        slice of it): its rows are a map of their own, as `x W_g` and `x W_u` are. The key
        names the piece, so picking the same piece twice gives the same root."""
        op = ops.op_name(n, self.modules)
        if op not in PICKS or not n.args or not isinstance(n.args[0], fx.Node):
            return None
        source = n.args[0]
        if op == "getitem":  # an output of split/chunk/unbind
            if ops.op_name(source, self.modules) not in SPLITS or not source.args:
                return None
            product = source.args[0]
        else:
            product = source
        if not isinstance(product, fx.Node) or ops.op_name(product, self.modules) not in _PRODUCTS \
                or not any(i in self.weights for i in product.all_input_nodes):
            return None
        return (source, op, tuple(a for a in n.args[1:] if not isinstance(a, fx.Node)))

    def gating(self, node: fx.Node) -> bool:
        """`a · b` of two live activations from different maps: a bilinear unit (SwiGLU's
        `silu(x W_g) · x W_u`, GLU variants), not an elementwise function of one activation."""
        terms = [i for _, i in ops.tensor_inputs(node) if i in self.live and i not in self.weights]
        if len(terms) != 2 or terms[0] is terms[1]:
            return False
        a, b = self._root_bits(terms[0]), self._root_bits(terms[1])
        if (a | b) & self._placeholder_roots:
            return False  # a graph input (a float mask, `x · f(x)` on the raw input): no gate
        return not (a & b)

    def summand(self, x: Any) -> float:
        """What `x` adds to a sum's scale: live activations only (not masks, not numbers)."""
        return self.value.get(x, 0.0) if isinstance(x, fx.Node) and x in self.live else 0.0

    def _compute(self, node: fx.Node, params: Mapping[fx.Node, str], biases: set[str]) -> float:
        if node in params:
            return 0.0 if params[node] in biases else 1.0
        if node.op in ("placeholder", "get_attr"):
            if is_integer(node):
                return 0.0
            value = self._values.get(node)
            if (node not in self.live and isinstance(value, torch.Tensor) and value.numel()
                    and value.is_floating_point()):
                if value.is_meta:  # a weightless model or an FSDP2 shadow: unknown, read as 1
                    self.unknown.append(node)
                    return 1.0
                return float(value.detach().abs().max())  # a stored constant: `x * sqrt(d)`
            return 1.0
        if node.op == "output":
            return 1.0
        if node not in self.live:  # a constant: keep a known size through casts and views
            src = node.args[0] if node.args else None
            if ops.op_name(node, self.modules) in SCALE_PASSTHROUGH and isinstance(src, fx.Node):
                return self.value.get(src, 1.0)
            return 1.0
        if is_integer(node):
            return 0.0
        op = ops.op_name(node, self.modules)
        rule = SCALE_RULES.get(op)
        if rule is not None:
            return float(rule(node, ops.arguments(node), self))
        inputs = [self.value.get(i, 1.0) for _, i in ops.tensor_inputs(node) if i in self.live]
        return max(inputs, default=1.0)


#: Ops that keep an activation's values (casts, copies, views): its scale passes through them.
SCALE_PASSTHROUGH = frozenset({"to", "type", "type_as", "float", "half", "bfloat16", "contiguous", "clone",
                               "detach", "alias", "view", "reshape", "expand", "unsqueeze", "squeeze"})


def is_integer(node: fx.Node) -> bool:
    """An integer-valued node (token ids, positions): indices, not activations."""
    val = node.meta.get("val", node.meta.get("example_value"))
    dtype = getattr(val, "dtype", None)
    return dtype is not None and not (dtype.is_floating_point or dtype.is_complex)


def scaled_bond(b: BondInput, S: Scales) -> tuple[float, bool]:
    """(sensitivity, assumed?) of `b.op` to `b.input` in the "scale" mode."""
    rule = SCALED_BOND_RULES.get(b.op)
    if rule is None:
        return bond_sensitivity(b)
    value = rule(b, S)
    return (1.0, True) if value is None else (float(value), False)


def atom_gain(use: Use, kind: str, S: Scales) -> float:
    """How far a unit step of an atom (in its own norm) moves its op's output: the scale of
    what the parameter multiplies. Embedding rows, biases and normalisation gains act on
    unit-scale quantities (1); a weight or an elementwise gain multiplies its op's data."""
    if kind == "embedding" and use.op in MATRIX_OPS and len(use.shape) == 2:
        return _read_as_matrix(use, S)
    if kind in ("embedding", "bias", "fallback") or use.op in NORMALISATIONS:
        return 1.0
    gain = 1.0
    for key, inp in use.args.items():
        if not isinstance(inp, fx.Node) or key == use.key or _is_bias_key(use.op, key):
            continue
        if inp in S.live and not is_integer(inp):
            gain *= S(inp)
    return gain



def _read_as_matrix(use: Use, S: Scales) -> float:
    """An embedding table also used as a matrix (a head tied to the token embedding): its
    step is sized in the embedding's norm (each row's RMS), so this use's gain converts. A
    row change of RMS 1 (ℓ2 norm √d) meets an input of RMS S(x) (ℓ2 norm S·√d): the output
    entry moves by their inner product, S·√d for directions that are not aligned (S·d when
    they are). Typical, as sums are read in hybrid mode: S(x)·√d."""
    if use.op == "einsum":
        operands, equation = _einsum_operands(use)
        weight = _param_node(use, operands)
        shape = use.shape if not use.transposed else (*use.shape[:-2], use.shape[-1], use.shape[-2])
        d = _einsum_contracted(equation, operands, weight, shape) if equation and weight is not None else None
        others = [x for x in operands if x is not weight]
    else:
        second = use.op != "linear" and use.key in ("other", "mat2", 1)  # x @ W: W's rows are contracted
        contracted = 0 if second else 1  # linear(x, W) and W @ x contract W's columns
        d = use.shape[contracted if not use.transposed else 1 - contracted]
        others = [inp for key, inp in use.args.items() if key != use.key and not _is_bias_key(use.op, key)]
    gain = 1.0
    for inp in others:
        if isinstance(inp, fx.Node) and inp in S.live and not is_integer(inp):
            gain *= S(inp)
    return gain * math.sqrt(d) if S.hybrid and d else gain


def _einsum_operands(use: Use) -> tuple[list[Any], str | None]:
    """einsum's operands and equation, whether the front end passed the operands as a list
    (`torch.export`: `einsum(eq, [h, W])`) or one by one (`symbolic_trace`: `einsum(eq, h, W)`)."""
    equation = use.args.get("equation", use.args.get(0))
    tensors = use.args.get("tensors")
    if isinstance(tensors, (list, tuple)):
        return list(tensors), equation if isinstance(equation, str) else None
    operands = [v for k, v in sorted(((k, v) for k, v in use.args.items() if isinstance(k, int) and k > 0))]
    return operands, equation if isinstance(equation, str) else None


def _einsum_contracted(equation: str, operands: list[Any], weight: fx.Node,
                       shape: tuple[int, ...]) -> int | None:
    """The product of the parameter's dimensions that the equation sums over (absent from
    the output): the d of `btd,vd->btv`. None when the equation cannot be read."""
    if "->" not in equation or "..." in equation:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    for spec, operand in zip(inputs.split(","), operands):
        if operand is weight and len(spec) == len(shape):
            return math.prod(n for letter, n in zip(spec, shape) if letter not in output) or None
    return None


def _param_node(use: Use, operands: list[Any]) -> fx.Node | None:
    """The operand the parameter entered at: the key's (one by one), or in a `tensors` list
    the operand read straight from a parameter or attribute with the parameter's shape."""
    if isinstance(use.key, int):
        value = use.args.get(use.key)
        return value if isinstance(value, fx.Node) else None
    for operand in operands:
        if isinstance(operand, fx.Node) and operand.op in ("placeholder", "get_attr"):
            val = operand.meta.get("val", operand.meta.get("example_value"))
            if val is not None and tuple(val.shape) == tuple(use.shape):
                return operand
    return None


def _is_bias_key(op: str, key: Any) -> bool:
    """The additive operand of a matrix op (`linear(x, W, bias)`, `addmm(bias, a, b)`)."""
    return key == "bias" or (op in ("addmm", "baddbmm") and key in ("input", "self", 0))


# ---------------------------------------------------------------------------------------
# Output scales


def _sum_of_inputs(node: fx.Node, args: dict, S: Scales) -> float:
    """Live activations and numbers add their scales (`1 + tanh(x)` is about 2, not 1);
    masks and other constant tensors do not (an additive −inf mask is not a size)."""
    terms = [S.summand(i) for _, i in ops.tensor_inputs(node)]
    terms += [abs(float(v)) for v in node.args[:2]  # the operands, not `alpha=`
              if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if node in S.weights:  # `1 + w`: a gain stored as its offset from 1 is still a gain
        return max(terms, default=1.0)
    p = S.p_of_sum(node)
    total = sum(t ** p for t in terms) ** (1.0 / p)
    return total if total > 0 else max((S(i) for _, i in ops.tensor_inputs(node)), default=1.0)


def _product(node: fx.Node, args: dict, S: Scales) -> float:
    rows = [v for v in args.values() if isinstance(v, fx.Node) and v in S.live]
    if S.table_multipliers and len(rows) == 1 and _table_rows(rows[0], S):
        return S(rows[0])  # `table[ids] · c`: the table's rows are sized with their multiplier
    out = 1.0
    for v in args.values():
        if isinstance(v, fx.Node) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            out *= S(v)
    return out


def _table_rows(node: fx.Node, S: Scales) -> bool:
    """`node` is the rows of a lookup table (through casts and views): an embedding's output.

    Why its constant multiplier keeps its scale (hybrid mode): Gemma, BioGPT, Pegasus and
    others multiply the token rows by √d, a reparameterisation of the table (its rows are
    initialised that much smaller), not a stream √d times every branch. Read as √d · 1, the
    stream's scale dwarfed every branch, the blocks' downstreams fell by √d and their budgets
    rose by √d: Gemma's q and k moved 5.8 per step in their own norm (budget × lr 0.25). The
    multiplier still counts in the table's own downstream (its bond is |c|), so the table's
    effective rows move as an unscaled table's would."""
    while ops.op_name(node, S.modules) in SCALE_PASSTHROUGH and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return ops.op_name(node, S.modules) == "embedding"


def _quotient(node: fx.Node, args: dict, S: Scales) -> float:
    num, den = _first(args), ops.arg(args, "other", 1)
    d = S(den)
    return S(num) / d if d > 0 else S(num)


def _power(node: fx.Node, args: dict, S: Scales) -> float:
    x, p = _first(args), ops.arg(args, "exponent", 1, 2.0)
    if isinstance(p, (int, float)) and S(x) > 0:
        return S(x) ** float(p)
    return S(x)


def _square(node: fx.Node, args: dict, S: Scales) -> float:
    return S(_first(args)) ** 2


def _first(args: dict) -> Any:
    for key in ("input", "self", 0):
        if key in args:
            return args[key]
    return None


def _exponent(p: float) -> ScaleRule:
    def rule(node: fx.Node, args: dict, S: Scales) -> float:
        s = S(_first(args))
        return s ** p if s > 0 else 1.0
    return rule


def _unit(node: fx.Node, args: dict, S: Scales) -> float:
    return 1.0


def _vector_norm(node: fx.Node, args: dict, S: Scales) -> float:
    """‖x‖₂ over n entries of RMS S is S·√n."""
    return S(_first(args)) * math.sqrt(ops.reduction_size(node))


def _summed(node: fx.Node, args: dict, S: Scales) -> float:
    return S(_first(args)) * ops.reduction_size(node)


def _matrix_product(node: fx.Node, args: dict, S: Scales) -> float:
    """Linear maps and products of activations: the product of the operands' scales."""
    out, op = 1.0, ops.op_name(node)
    for key, inp in args.items():
        if isinstance(inp, fx.Node) and not _is_bias_key(op, key) and not is_integer(inp):
            out *= S(inp)
    return out


def _attention(node: fx.Node, args: dict, S: Scales) -> float:
    return S(ops.arg(args, "value", 2))


for _op in SUMS:
    register_scale_rule(_op, scale=_sum_of_inputs)
register_scale_rule("mul", scale=_product)
register_scale_rule("div", scale=_quotient)
register_scale_rule("pow", scale=_power)
register_scale_rule("square", scale=_square)
register_scale_rule("sqrt", scale=_exponent(0.5))
register_scale_rule("rsqrt", scale=_exponent(-0.5))
register_scale_rule("reciprocal", scale=_exponent(-1.0))
register_scale_rule("var", scale=_exponent(2.0))
register_scale_rule("norm", scale=_vector_norm)
register_scale_rule("sum", scale=_summed)
for _op in (*NORMALISATIONS, "softmax", "sigmoid", "embedding"):
    register_scale_rule(_op, scale=_unit)
register_scale_rule("tanh", scale=lambda n, a, S: min(1.0, S(_first(a))))
for _op in ("linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "conv1d", "conv2d", "conv3d",
            "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution", "einsum"):
    register_scale_rule(_op, scale=_matrix_product)
register_scale_rule("scaled_dot_product_attention", scale=_attention)
for _op in ("to", "type_as", "expand_as", "view", "reshape"):  # the second argument is metadata
    register_scale_rule(_op, scale=lambda node, args, S: S(node.args[0]) if node.args else 1.0)


# ---------------------------------------------------------------------------------------
# Sensitivities in this mode


def _mul_bond(b: BondInput, S: Scales) -> float:
    """Product of the scales of every other operand (numbers by |c|, constants by 1). In
    hybrid mode a gate (`Scales.gating`) counts each operand half: one well-normed bilinear
    unit of sensitivity 1 to its two inputs together, as attention counts q, k, v a third."""
    out = 0.5 if S.hybrid and S.gating(b.node) else 1.0
    for v in b.args.values():
        if v is b.input:
            continue
        if isinstance(v, fx.Node):
            out *= 1.0 if is_integer(v) else S(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out *= abs(float(v))
    return out


def _div_bond(b: BondInput, S: Scales) -> float:
    den = ops.arg(b.args, "other", 1)
    if b.input is den:
        return 0.0  # a normalisation statistic (see docs/norms.md)
    d = S(den)
    return 1.0 / d if d > 0 else 1.0


def _pow_bond(b: BondInput, S: Scales) -> float:
    p = ops.arg(b.args, "exponent", 1, 2.0)
    if not isinstance(p, (int, float)):
        return 1.0
    s = S(b.input)
    return abs(float(p)) * (s ** (float(p) - 1) if s > 0 else 1.0)


def _square_bond(b: BondInput, S: Scales) -> float:
    return 2.0 * S(b.input)


def _normalisation_bond(b: BondInput, S: Scales) -> float:
    if b.key not in ("input", 0):
        return 0.0
    s = S(b.input)
    return 1.0 / s if s > 0 else 1.0


def _matrix_bond(b: BondInput, S: Scales) -> float:
    """Sensitivity to one operand of a product: the product of the others' scales (a
    weight counts 1, well-normed); 1 to an additive bias."""
    if _is_bias_key(b.op, b.key):
        return 1.0
    out = 1.0
    for k, v in b.args.items():
        if isinstance(v, fx.Node) and v is not b.input and not _is_bias_key(b.op, k) and not is_integer(v):
            out *= S(v)
    return out


def _attention_bond(b: BondInput, S: Scales) -> float:
    """q, k and v count 1/3 each: attention as one well-normed module of sensitivity 1 (a
    convex combination of values), not three. q and k enter in relative terms; a live additive
    mask (a learned position bias) like the logits, S(v)/3. Constant masks carry no D (not live)."""
    if b.key in ("value", 2):
        return 1.0 / 3.0
    if b.key in ("query", "key", 0, 1):
        s = S(b.input)
        return S(ops.arg(b.args, "value", 2)) * _temperature(b, S) / (3.0 * s) if s > 0 else 1.0 / 3.0
    # an additive float mask (T5's learned position bias) enters the logits unscaled
    return S(ops.arg(b.args, "value", 2)) / 3.0


def _temperature(b: BondInput, S: Scales) -> float:
    """SDPA's `scale` · √d (1 without `scale`: the default 1/√d), times the constant factors
    applied to q and k on their way from their projections (`patterns.operand_factor`): how
    far its logits move under a relative change of q or k. T5 passes scale=1, so its logits
    move √d times as far; OPT multiplies q by 1/√d and passes scale=1, the usual temperature
    (read as T5's, its q and k took a tenth of Llama's budgets). Unknown: 1."""
    query, key = ops.arg(b.args, "query", 0), ops.arg(b.args, "key", 1)
    shape = ops.shape_of(query) if isinstance(query, fx.Node) else None
    if not shape:
        return 1.0
    scale = b.args.get("scale")
    t = abs(float(scale)) * math.sqrt(shape[-1]) if isinstance(scale, (int, float)) and not isinstance(scale, bool) \
        else 1.0
    for x in (query, key):
        f = operand_factor(x, S.live, S.modules, S._values) if isinstance(x, fx.Node) else 1.0
        if f is None:
            return 1.0
        t *= f
    return t


def _summed_bond(b: BondInput, S: Scales) -> float:
    return ops.reduction_size(b.node)


register_scale_rule("mul", bond=_mul_bond)
register_scale_rule("div", bond=_div_bond)
register_scale_rule("pow", bond=_pow_bond)
register_scale_rule("square", bond=_square_bond)
register_scale_rule("sum", bond=_summed_bond)
for _op in NORMALISATIONS:
    register_scale_rule(_op, bond=_normalisation_bond)
for _op in ("linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "conv1d", "conv2d", "conv3d",
            "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution"):
    register_scale_rule(_op, bond=_matrix_bond)
register_scale_rule("scaled_dot_product_attention", bond=_attention_bond)
