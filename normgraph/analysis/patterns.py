"""Graph patterns read by their math, not by their op names.

A pattern is a group of ops that together compute something whose sensitivity is known
exactly, where summing over the group's paths would count one change several times:

* a rotary position embedding `x·cos ± R(x)·sin` is a rotation of x (`rotary_joins`);
* pieces of one activation, some rotated, concatenated back (partial rotary) are a rotation
  of it (`_reassembled_source`);
* attention written out op by op, `softmax(q·kᵀ·c + bias) @ v` (eager attention, ALiBi,
  relative position terms, soft-capping), is the attention that
  `scaled_dot_product_attention` computes in one op (`attention_reads`).

`analyze.downstream` routes each pattern's downstream straight to the activations it reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.fx as fx

from . import ops
from .trace import Captured


#: Ops that only rearrange or negate entries: a rotary embedding splits, negates and
#: concatenates halves of one activation before weighting them by cos and sin.
_REARRANGE = {"slice", "getitem", "narrow", "select", "split", "split_with_sizes", "chunk", "unbind",
              "neg", "cat", "concat", "stack", "view", "reshape", "transpose", "permute", "contiguous",
              "clone", "to", "unsqueeze", "squeeze", "flatten", "unflatten", "alias", "movedim", "expand"}


def rotary_joins(cap: Captured, live: set[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Sums `x·cos ± R(x)·sin` (rotary position embeddings) → the activation x they rotate.

    Each input of the add/sub must be one activation x, moved by `_REARRANGE` ops only,
    times a constant (not live) tensor. With cos² + sin² = 1 the sum is a rotation of x: its
    sensitivity to x is 1 (modula's), where the path sum would count 2-4 paths of 1 each.
    """
    out: dict[fx.Node, fx.Node] = {}
    for node in cap.graph.nodes:
        op = ops.op_name(node, cap.modules)
        if op in ("cat", "concat") and node in live:
            source = _reassembled_source(node, live, cap, out)
            if source is not None:
                out[node] = source
            continue
        if op not in ("add", "sub") or len(node.all_input_nodes) != 2:
            continue
        sources: set[fx.Node] = set()
        for term in node.all_input_nodes:
            src = _rotated_source(term, live, cap)
            if src is None:
                break
            sources |= src
        else:
            if len(sources) == 1:
                out[node] = next(iter(sources))
    return out


def _reassembled_source(node: fx.Node, live: set[fx.Node], cap: Captured,
                        rotations: dict[fx.Node, fx.Node]) -> fx.Node | None:
    """The activation x when `node = cat(pieces)` reassembles x from rearranged slices of it,
    some of them rotated (partial rotary: `cat(rotary(x[..., :r]), x[..., r:])`); else None.

    Why: the pieces are disjoint parts of one activation passed through isometries and put
    back together, so the whole is a rotation of x (sensitivity 1). Summed over its paths
    it counted once per piece: partial rotary doubled q's and k's downstream (Phi, GPT-NeoX,
    StableLM, Persimmon), and their steps were half a fully rotated model's."""
    pieces = [i for i in node.all_input_nodes if i in live]
    if len(pieces) < 2:
        return None
    sources: set[fx.Node] = set()
    for piece in pieces:
        stack, found = [piece], set()
        while stack:
            v = stack.pop()
            if v in rotations:
                v = rotations[v]
            elif ops.op_name(v, cap.modules) in _REARRANGE and v.op != "placeholder":
                inputs = [i for i in v.all_input_nodes if i in live]
                if not inputs:
                    return None
                stack.extend(inputs)
                continue
            found.add(v)
        if len(found) != 1:
            return None
        sources |= found
    if len(sources) != 1 or not any(p in rotations for p in pieces):
        return None
    return next(iter(sources))


def _rotated_source(term: fx.Node, live: set[fx.Node], cap: Captured) -> set[fx.Node] | None:
    """The live activations behind `term = rearranged(x) * constant`, or None if not that shape."""
    if ops.op_name(term, cap.modules) != "mul" or term not in live:
        return None
    tensors = term.all_input_nodes
    data = [t for t in tensors if t in live]
    if len(tensors) != 2 or len(data) != 1:
        return None
    sources: set[fx.Node] = set()
    stack = [data[0]]
    while stack:
        v = stack.pop()
        if ops.op_name(v, cap.modules) in _REARRANGE and v.op != "placeholder":
            inputs = [i for i in v.all_input_nodes if i in live]
            if not inputs:
                return None
            stack.extend(inputs)
        else:
            sources.add(v)
    return sources




@dataclass(frozen=True)
class AttentionRead:
    """`softmax(logits) @ value`, the logits a sum of products of two activations (q·kᵀ and,
    in disentangled attention, q·posᵀ) and of other live terms (a learned position bias).
    `temperatures[i]` is product i's logit temperature: the constant factors on its way to
    the softmax times √(contracted dim), 1 for the usual `q·kᵀ/√d`."""

    value: fx.Node
    products: tuple[tuple[fx.Node, fx.Node], ...]
    terms: tuple[fx.Node, ...]
    temperatures: tuple[float, ...] = ()


#: Ops that move or cast a tensor without changing what it means.
_PASSTHROUGH = {"to", "type_as", "view", "reshape", "dropout", "contiguous", "clone", "alias", "expand",
                "float", "half", "bfloat16", "unsqueeze", "squeeze", "identity", "flatten", "unflatten"}
#: Ops a logit passes through on its way to the softmax (layout, casts, masks, soft-capping).
_LOGIT_WAY = _PASSTHROUGH | {"transpose", "permute", "movedim", "masked_fill", "where", "tanh", "gather",
                             "index_select", "index", "getitem", "slice", "select", "narrow"}
_PRODUCTS = ("matmul", "bmm", "baddbmm", "mm", "einsum")


def attention_reads(cap: Captured, live: set[fx.Node], weights: set[fx.Node]) -> dict[fx.Node, AttentionRead]:
    """Attention written out op by op: the `P @ v` node → what it reads.

    Why: `scaled_dot_product_attention` counts q, k and v a third each, q and k in relative
    terms (docs/concepts.md §5). Written out, the same attention was a chain of products,
    each counted at the scales of its operands: q, k and v a whole each and a learned bias in
    full. Bloom (ALiBi, `baddbmm`), MPT, Gemma 2 (soft-capping), GPT-Neo, DeBERTa
    (disentangled terms), RoFormer and MPNet got attention budgets a third to a ninth of
    the same model's with SDPA."""
    out: dict[fx.Node, AttentionRead] = {}
    for node in cap.graph.nodes:
        if ops.op_name(node, cap.modules) not in ("matmul", "bmm") or node not in live:
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != 2 or not all(a in live and a not in weights for a in operands):
            continue
        probs = _through(operands[0], _PASSTHROUGH, cap)
        if ops.op_name(probs, cap.modules) != "softmax":
            continue
        logits = probs.args[0] if probs.args and isinstance(probs.args[0], fx.Node) else None
        read = _logit_terms(logits, live, weights, cap) if logits is not None else None
        if read is not None:
            out[node] = AttentionRead(operands[1], *read)
    return out


def temperature(factor: float | None, operand: fx.Node) -> float:
    """`factor` · √d for a product that contracts the last dim d of `operand` (q): how far the
    logits move under a relative change of q or k, against the usual `q·kᵀ/√d` (1). A factor
    whose value is not known (a constant computed in the graph, a buffer on meta) reads as the
    usual scaling: 1."""
    shape = ops.shape_of(operand)
    return factor * math.sqrt(shape[-1]) if shape and factor is not None else 1.0


def _constant(x: object, values: Mapping[fx.Node, object]) -> float | None:
    """The magnitude of a constant factor: a number's, or a stored scalar tensor's; None if unknown."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return abs(float(x))
    value = values.get(x) if isinstance(x, fx.Node) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta:
        return abs(float(value))
    return None


def _scaling(n: fx.Node, data: fx.Node, modules: Mapping[str, Any], values: Mapping[fx.Node, object]) -> float | None:
    """The constant `n` (a mul or div of `data` by something else) multiplies `data` by."""
    other = [a for a in n.args[:2] if a is not data]
    c = _constant(other[0], values) if other else 1.0
    return None if c is None or c == 0 else (1.0 / c if ops.op_name(n, modules) == "div" else c)


def _times(factor: float | None, c: float | None) -> float | None:
    """factor · c, unknown (None) if either is unknown or c is 0."""
    return None if factor is None or c is None or c == 0 else factor * c


def _through(node: fx.Node, way: set[str], cap: Captured) -> fx.Node:
    """Walk up single-input ops in `way` to the op that made the tensor."""
    while ops.op_name(node, cap.modules) in way and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _logit_terms(logits: fx.Node, live: set[fx.Node], weights: set[fx.Node], cap: Captured):
    """(products, terms, temperatures) that add up to `logits`, or None when they are not
    attention logits (a product with a weight, an elementwise product of two activations)."""
    products: list[tuple[fx.Node, fx.Node]] = []
    terms: list[fx.Node] = []
    temps: list[float] = []
    stack: list[tuple[fx.Node, float | None]] = [(logits, 1.0)]
    seen: set[fx.Node] = set()
    while stack:
        n, factor = stack.pop()
        if n in seen or n not in live:
            continue
        seen.add(n)
        op = ops.op_name(n, cap.modules)
        inputs = [i for i in n.all_input_nodes if i in live]
        if op in _LOGIT_WAY:
            data = n.args[0] if n.args and isinstance(n.args[0], fx.Node) and n.args[0] in live else None
            if op == "where":  # where(mask, x, y): the live branches are logits
                stack.extend((i, factor) for i in n.args[1:3] if isinstance(i, fx.Node) and i in live)
            elif data is not None:
                stack.append((data, factor))
        elif op in ("mul", "div"):
            if len(inputs) != 1:
                return None  # a product of two activations is not a scaling of the logits
            stack.append((inputs[0], _times(factor, _scaling(n, inputs[0], cap.modules, cap.values))))
        elif op in ("add", "sub"):
            stack.extend((i, factor) for i in inputs)
        elif op in _PRODUCTS:
            if op == "einsum":
                tensors = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
                pair = [a for a in tensors if isinstance(a, fx.Node)]
            else:
                pair = [a for a in (n.args[1:3] if op == "baddbmm" else n.args[:2]) if isinstance(a, fx.Node)]
            if op == "baddbmm" and isinstance(n.args[0], fx.Node) and n.args[0] in live:
                stack.append((n.args[0], factor))  # baddbmm(bias, q, k): the bias is a term
            if len(pair) != 2 or not all(a in live for a in pair) or all(a in weights for a in pair):
                return None  # q·kᵀ, or q·posᵀ with pos made from parameters only (DeBERTa's c2p)
            if op == "baddbmm":
                factor = _times(factor, _constant(n.kwargs.get("alpha", n.args[4] if len(n.args) > 4 else 1.0), cap.values))
            for x in pair:
                factor = _times(factor, operand_factor(x, live, cap.modules, cap.values))
            products.append((pair[0], pair[1]))
            temps.append(temperature(factor, pair[0]))
        else:
            terms.append(n)
    return (tuple(products), tuple(terms), tuple(temps)) if products else None


def operand_factor(x: fx.Node, live: set[fx.Node], modules: Mapping[str, Any],
                   values: Mapping[fx.Node, object]) -> float | None:
    """Constant factors applied to q or k between their projection and the product
    (DeBERTa divides k by √(3d) there; OPT multiplies q by 1/√d and calls SDPA with scale 1)."""
    factor: float | None = 1.0
    while True:
        op = ops.op_name(x, modules)
        inputs = [i for i in x.all_input_nodes if i in live]
        if op in ("mul", "div") and len(inputs) == 1:
            factor = _times(factor, _scaling(x, inputs[0], modules, values))
            if factor is None:
                return None
            x = inputs[0]
        elif op in _REARRANGE and len(inputs) == 1 and x.op != "placeholder":
            x = inputs[0]
        else:
            return factor


#: Ops after which a projection's output still holds every row of its weight, in some layout.
_ROW_MOVES = {"view", "reshape", "permute", "transpose", "t", "numpy_T", "contiguous", "clone", "to", "alias",
              "unsqueeze", "squeeze", "flatten", "unflatten", "expand", "movedim", "swapaxes", "dropout"}
#: Ops that pick a piece of a tensor, and the splits whose outputs `getitem` picks.
PICKS = ("getitem", "slice", "narrow", "select")
SPLITS = ("split", "split_with_sizes", "chunk", "unbind", "tensor_split")
#: Ops that may pick a subset of those rows (the split of a fused projection).
_ROW_PICKS = {*PICKS, *SPLITS, "index", "index_select"}
#: How far the pieces of one part are followed to see whether they are put back together.
_REASSEMBLY_DEPTH = 24


def output_parts(node: fx.Node, rows: int, cap: Captured, live: set[fx.Node]) -> list[list[int]] | None:
    """The rows of a projection's weight, grouped by the part of its output each is read as
    (a fused q/k/v projection: three groups, in any layout), or None when one consumer reads
    every row or the layout cannot be followed.

    How: the projection's output is replaced by a tensor holding each entry's row index, and
    the ops that only move or pick entries are run on it, so every later piece holds the
    rows it came from. A piece that holds a strict subset of the rows is a part; pieces that
    are concatenated back into one activation (partial rotary slices q and puts it back
    together) are one part."""
    val = node.meta.get("val", node.meta.get("example_value"))
    shape = tuple(getattr(val, "shape", ()))
    if not shape or int(shape[-1]) != rows or rows < 2:
        return None
    values: dict[fx.Node, object] = {node: torch.arange(rows).expand(*shape).contiguous()}
    pieces: list[tuple[fx.Node, frozenset[int]]] = []
    stack = [node]
    while stack:
        n = stack.pop()
        for user in n.users:
            op = ops.op_name(user, cap.modules)
            if user.op == "output" or (op not in _ROW_MOVES and op not in _ROW_PICKS):
                if user in live or user.op == "output":
                    return None  # a consumer reads the rows as they are: not a fused projection
                continue
            out = _run_on(user, values, cap)
            if out is None:
                return None
            values[user] = out
            if isinstance(out, torch.Tensor):
                held = frozenset(out.unique().tolist())
                if len(held) < rows:
                    pieces.append((user, held))
                    continue
            stack.append(user)
    if len(pieces) < 2:
        return None
    groups = _merge_reassembled(pieces, cap)
    covered = sorted(r for g in groups for r in g)
    if len(groups) < 2 or covered != list(range(rows)):
        return None  # overlapping or missing rows: not a partition
    return [sorted(g) for g in groups]


def _run_on(user: fx.Node, values: dict[fx.Node, object], cap: Captured):
    """Run `user` with its tensor inputs replaced by their index tensors (None if it cannot)."""
    def resolve(a):
        if isinstance(a, fx.Node):
            if a in values:
                return values[a]
            v = cap.values.get(a)
            v = a.meta.get("val") if v is None else v
            if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and not v.is_meta
                                               and not v.is_floating_point() and v.numel() <= 1 << 16
                                               and type(v) is torch.Tensor):
                return v
            raise LookupError(a.name)
        if isinstance(a, (list, tuple)):
            return type(a)(resolve(x) for x in a)
        return a
    try:
        args = resolve(user.args)
        kwargs = {k: resolve(v) for k, v in user.kwargs.items()}
        if user.op == "call_method":
            return getattr(args[0], user.target)(*args[1:], **kwargs)
        if user.op == "call_function":
            return user.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - an op this reading cannot replay: no parts
        return None
    return None


def _merge_reassembled(pieces: list[tuple[fx.Node, frozenset[int]]], cap: Captured) -> list[set[int]]:
    """Row groups, pieces that meet again in one `cat` (within a few ops) merged."""
    reach: list[set[fx.Node]] = []
    for piece, _ in pieces:
        seen, frontier = set(), [piece]
        while frontier and len(seen) < _REASSEMBLY_DEPTH:
            n = frontier.pop()
            for u in n.users:
                if u not in seen and ops.op_name(u, cap.modules) in _REARRANGE | {"mul", "add", "sub"}:
                    seen.add(u)
                    frontier.append(u)
        reach.append({n for n in seen if ops.op_name(n, cap.modules) in ("cat", "concat")})
    groups = [set(rows) for _, rows in pieces]
    parent = list(range(len(pieces)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i
    for i in range(len(pieces)):
        for j in range(i):
            if reach[i] & reach[j]:
                parent[root(i)] = root(j)
    merged: dict[int, set[int]] = {}
    for i, g in enumerate(groups):
        merged.setdefault(root(i), set()).update(g)
    return list(merged.values())
