"""Norm inference: from a captured graph to atoms with norms, masses, sensitivities, budgets.

The pass is four plain functions over the captured graph:

1. `downstream`: reverse path-sum of bond sensitivities from the outputs, D(out) = 1 and
   D(v) = Σ over uses of v by an op of (that op's sensitivity to that input) × D(op output);
2. `classify`: each trainable parameter's uses (after pure data movement) and the atom rule
   of each consuming op;
3. masses: default masses per kind; in "hybrid" mode the residual body (`residual`) shares
   `BODY_MASS` (`_weigh_body`) and its budgets are read in quadrature
   (`_read_body_in_quadrature`) and depth-flat (`_flatten_body`); the matrices inside any residual branches are marked for
   `BODY_DECAY` (`_decay_body`); beside a body, tables read at fixed indices and the gains in
   front of a tied head take their own masses (`_weigh_position_tables`, `_weigh_tied_head_norm`);
   a conv reading the raw input is a `stem` (`_mark_stems`), and one whose output only a
   BatchNorm reads is a `channel_conv` (`_mark_channel_convs`);
   then the user's `masses` prefixes (`apply_masses`, modula's tare);
4. budgets: budget = mass / total_mass / D(output of the atom's op) × budget_scale, modula's
   target_norm at T=1 (budget_scale is 1 outside a residual body).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

import networkx as nx
import torch
import torch.fx as fx

from ..core.graph import Atom, Diagnostics, NormGraph, budget_of
from ..core.kinds import is_orthogonalized, kind_of
from ..core.wrappers import WRAPPER_PREFIX, unwrap_data_parallel
from . import ops
from .rules import (ATOM_RULES, PARAM_FLOW,
                    AtomSpec, BondInput, Use, bond_sensitivity, module_entry)
from .patterns import attention_reads, rotary_joins
from .scale import Scales, atom_gain, scaled_bond
from .trace import Captured, capture
from .default import apply_default, cap_budgets, plain_residuals
from .options import AnalysisOptions
from .wrappers import analysable, on_meta, to_meta

SENSITIVITY_MODES = ("hybrid", "scale", "modula", "typical")
#: The default mode (docs/concepts.md says why, with the measurements that chose it).
DEFAULT_SENSITIVITY = "hybrid"
FALLBACK_NOTE = "fallback: RMS norm of the whole tensor, dual = normalise to RMS 1"


def analyze(model: torch.nn.Module, example_inputs: Any = None,
            example_kwargs: Mapping[str, Any] | None = None,
            masses: Mapping[str, float] | None = None, *,
            kinds: Mapping[str, str] | None = None, frontend: str = "auto",
            sensitivity: str = DEFAULT_SENSITIVITY, options: AnalysisOptions | None = None,
            **switches: Any) -> NormGraph:
    """Infer every trainable parameter's operator norm, mass, sensitivity and budget.

    Args:
        model: any `torch.nn.Module` (parameters on the meta device too: only shapes and the
            graph are read).
        example_inputs: positional inputs (a tensor or a tuple); with them the graph comes
            from `torch.export` (more models trace that way than with `symbolic_trace`).
        example_kwargs: keyword inputs (e.g. `{"attention_mask": m}`).
        masses: module-name prefix (or exact parameter name) -> total mass of the atoms
            under it, split in proportion to their own masses; the longest key wins.
        kinds: parameter name -> kind, to override the rule's choice (e.g. a tied
            embedding treated as the output head: `{"wte.weight": "linear"}`).
        frontend: "auto", "export", "symbolic_trace" or "modules" (see `normgraph.analysis.trace`).
        sensitivity: how sensitivities combine (docs/concepts.md §5). "hybrid" (default):
            activation scales propagated from well-normed atoms, normalisations undo the
            growth of a residual stream (see `normgraph.analysis.scale`); plain sums combine
            in quadrature, weighted sums and shared readers worst case; then the default's
            steps (`normgraph.analysis.default`). "scale": the same scales, worst case
            everywhere. "typical": quadrature everywhere. "modula": modula's algebra exactly
            (every activation unit-sized).
        options: the switches of the default's steps (`AnalysisOptions`: each step can be
            turned off or set to another value). `**switches` is a shorthand for the same
            fields: `analyze(m, x, body_decay=0.05)` is
            `analyze(m, x, options=AnalysisOptions(body_decay=0.05))`.
    """
    options = (options or AnalysisOptions()).replace(**switches) if switches else (options or AnalysisOptions())
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"normgraph.analyze expects a torch.nn.Module, got {type(model).__name__}")
    if sensitivity not in SENSITIVITY_MODES:
        raise ValueError(f"sensitivity={sensitivity!r}: expected one of {SENSITIVITY_MODES}")
    options.resolved_body_mass(sensitivity)  # a body mass in "modula" mode: refused now
    _refuse_unsupported({n: p for n, p in model.named_parameters() if p.requires_grad and p.numel() > 0})
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    if unwrap_data_parallel(model) is not model:  # DDP: names as the wrapped module has them
        masses = {k.removeprefix(WRAPPER_PREFIX): v for k, v in (masses or {}).items()}
        kinds = {k.removeprefix(WRAPPER_PREFIX): v for k, v in (kinds or {}).items()}
    model, example_inputs, example_kwargs, wrapped = analysable(model, example_inputs, example_kwargs)
    weightless = on_meta(model)
    if weightless:  # shapes and the graph are all the analysis reads: run the inputs on meta too
        example_inputs, example_kwargs = to_meta(example_inputs), to_meta(example_kwargs)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad and p.numel() > 0}
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameters "
                         "(all are frozen, empty, or it has none): nothing to optimize")

    cap = capture(model, example_inputs, dict(example_kwargs) if example_kwargs else None, frontend)
    diag = Diagnostics(frontend=cap.frontend, trace_errors=dict(cap.errors), notes=list(cap.notes))
    if wrapped:
        diag.notes.append(wrapped)
    if weightless and not wrapped:
        diag.notes.append("parameters on the meta device: analysed from their shapes and the graph "
                          "(compile needs the weights: model.to_empty(device=...), then load them)")
    if cap.graph is None:
        atoms = _module_atoms(model, trainable, options.conv_mode, diag)
        graph = nx.DiGraph()
        first = next(iter(cap.errors.values()), "no strategy was tried")
        warnings.warn(
            f"normgraph could not capture a graph of {type(model).__name__} ({first}); using "
            "module-level rules: atoms from the layers that own parameters, no sensitivities "
            "(every downstream = 1). For the full analysis pass example_inputs "
            "(and example_kwargs) the model accepts.", stacklevel=2)
    else:
        uses = classify(cap, trainable, options.conv_mode, options.split_packed)
        scales = None
        if sensitivity in ("scale", "typical", "hybrid"):
            biases = {n for n, specs in uses.items()
                      if (kinds or {}).get(n, specs[0][0].kind if specs else "") == "bias"}
            live = _live(cap)
            scales = Scales(cap.graph, live, cap.params, biases, cap.modules, rotary_joins(cap, live),
                            p=1.0 if sensitivity == "scale" else 2.0, values=cap.values,
                            hybrid=sensitivity == "hybrid", table_multipliers=options.table_multipliers)
        if scales is not None and scales.unknown:
            names = [n.name for n in scales.unknown]
            diag.notes.append(f"constant(s) with no values (meta device): {', '.join(names[:4])}"
                              f"{' …' if len(names) > 4 else ''} count scale 1 where they multiply an "
                              "activation (with their values, their largest entry)")
        residual = (plain_residuals(cap, scales) if scales is not None and scales.hybrid and options.branch_fanout
                    else None)  # one walk, for the downstreams and the default's body
        D, assumed = downstream(cap, scales, attention=options.attention_patterns,
                                branches=residual.branch if residual is not None else None)
        diag.assumed_ops = assumed
        atoms = _graph_atoms(trainable, uses, D, kinds or {}, diag, scales)
        if scales is not None:
            apply_default(atoms, uses, cap, scales, D, sensitivity, kinds or {}, options, diag, residual)
        graph = _to_networkx(cap, D, uses, scales)
    _check_kinds(kinds or {}, trainable)
    apply_masses(atoms, masses or {})
    _budgets(atoms)
    if cap.graph is not None and sensitivity == "hybrid" and options.max_budget is not None:
        cap_budgets(atoms, options.max_budget, diag)
    if cap.graph is not None:
        _warn_spread(atoms, cap, D, scales, diag)
    for atom in atoms.values():
        if atom.name in graph:
            graph.nodes[atom.name].update(_atom_attrs(atom))
        else:
            graph.add_node(atom.name, **_atom_attrs(atom))
    return NormGraph(atoms, graph, diag)


def _refuse_unsupported(trainable: Mapping[str, torch.Tensor]) -> None:
    """Parameters the duality maps would silently damage: say so before anything runs."""
    complex_ = [n for n, p in trainable.items() if p.is_complex()]
    if complex_:
        raise ValueError(f"complex parameters are not supported (their updates would lose the imaginary "
                         f"part): {', '.join(complex_[:5])}; store them as real pairs (torch.view_as_real) "
                         "or optimize them with another optimizer")


# ---------------------------------------------------------------------------------------
# 1. Sensitivities


def _live(cap: Captured) -> set[fx.Node]:
    """Nodes whose value depends on a model input or a trainable parameter.

    Shape and dtype reads (`x.shape`, `x.size(1)`, and the ints computed from them for a
    `view`) carry no signal: with symbolic tracing they are nodes, but not live ones."""
    live: set[fx.Node] = set()
    for node in cap.graph.nodes:
        if node in cap.params or (node.op == "placeholder" and node not in cap.constants):
            live.add(node)
        elif PARAM_FLOW.get(ops.op_name(node, cap.modules)) == "metadata":
            continue
        elif any(i in live for i in node.all_input_nodes):
            live.add(node)
    return live


def _bond(b: BondInput, scales: Scales | None) -> tuple[float, bool]:
    return bond_sensitivity(b) if scales is None else scaled_bond(b, scales)


def downstream(cap: Captured, scales: Scales | None = None, attention: bool = True,
               branches: Mapping[fx.Node, fx.Node] | None = None) -> tuple[dict[fx.Node, float], dict[str, int]]:
    """D of every node (reverse path-sum), and the ops whose sensitivity had to be assumed.

    Without `scales` the bonds are modula's (every activation unit-sized); with them, the
    "scale" mode's (see `normgraph.analysis.scale`). With `branches` (each node inside a
    residual branch → the branch's output), an activation read inside two or more branches
    adds up its uses within each branch and sums the branches in quadrature, as a residual
    stream read by its next block does: the branches reach the output as independent terms
    of the stream (a parallel block's one norm read by attention and MLP, an encoder's
    output read by every decoder block)."""
    def p_of(node: fx.Node) -> float:  # how the uses of `node` combine: Σ (s·D(use))^p, then ^(1/p)
        return scales.p_of_uses(node) if scales is not None else 1.0

    fans: dict[fx.Node, bool] = {}

    def fanned(node: fx.Node) -> bool:  # read inside several branches, its uses otherwise summed
        if node not in fans:
            fans[node] = bool(branches) and p_of(node) == 1.0 and len(
                {branches[u] for u in node.users if u in branches}) > 1
        return fans[node]

    D: dict[fx.Node, float] = {n: 0.0 for n in cap.graph.nodes}  # Σ over uses of (s·D(use))^p
    per_branch: dict[fx.Node, dict[fx.Node | None, float]] = {}  # a fanned node: branch → Σ s·D(use)

    def add(x: fx.Node, v: float, user: fx.Node) -> None:
        if fanned(x):
            groups = per_branch.setdefault(x, {})
            key = branches.get(user)
            groups[key] = groups.get(key, 0.0) + v
        else:
            D[x] += v ** p_of(x)

    def total(node: fx.Node) -> float:
        if node in per_branch:  # only with `branches`, only in hybrid mode: `scales.p` (2)
            return sum(v ** scales.p for v in per_branch[node].values()) ** (1.0 / scales.p)
        return D[node] ** (1.0 / p_of(node))

    for out in cap.outputs:
        D[out] += 1.0
    live = scales.live if scales is not None else _live(cap)
    rotations = scales.rotations if scales is not None else rotary_joins(cap, live)
    # attention written out op by op reads as SDPA does in the scale modes (modula's own
    # algebra counts every path of it, as its bond for SDPA counts q, k and v a whole each)
    attention = attention_reads(cap, live, scales.weights) if scales is not None and attention else {}
    assumed: dict[str, int] = {}
    for node in reversed(cap.graph.nodes):
        d = total(node)  # every use of `node` comes after it: its sum is complete
        if d == 0.0 or node.op in ("placeholder", "get_attr", "output"):
            continue
        if node in rotations:  # a rotation of one activation: an isometry, one bond of 1
            add(rotations[node], d, node)
            continue
        if node in attention:  # as `_attention_bond` reads SDPA: a third each, q and k relative
            read, share = attention[node], d / 3.0
            sv = scales(read.value)
            add(read.value, share, node)
            for (a, b), t in zip(read.products, read.temperatures):
                for x in (a, b):
                    add(x, share * sv * t / (scales(x) or 1.0), node)
            for t in read.terms:
                add(t, share * sv, node)
            continue
        op = ops.op_name(node, cap.modules)
        entry = module_entry(cap.modules[str(node.target)]) if node.op == "call_module" else None
        args = None
        counted = False
        for key, inp in ops.tensor_inputs(node):
            if inp not in live:
                continue
            if entry is not None:
                s, was_assumed = entry.sensitivity, False
            else:
                args = args if args is not None else ops.arguments(node)
                s, was_assumed = _bond(BondInput(node, op, ops.key_of(args, inp), args, inp), scales)
            if was_assumed and not counted:
                assumed[op] = assumed.get(op, 0) + 1
                counted = True
            add(inp, s * d, node)
    return {n: total(n) for n in D}, assumed


# ---------------------------------------------------------------------------------------
# 2. Atoms


def _uses_of(param: fx.Node, shape: tuple[int, ...], modules: dict[str, torch.nn.Module],
             conv_mode: str, split_packed: bool) -> list[tuple[Use, str]]:
    """Follow a parameter through data movement to the ops that consume it.

    Returns (use, irregularity) pairs; irregularity is "" when the path is understood.
    """
    found: list[tuple[Use, str]] = []
    stack: list[tuple[fx.Node, bool, bool, str]] = [(param, False, False, "")]
    while stack:
        value, transposed, indexed, odd = stack.pop()
        for user in value.users:
            op = ops.op_name(user, modules)
            first = user.args[0] if user.args else None
            flow = PARAM_FLOW.get(op)
            if flow == "metadata":
                continue
            if first is value and (flow == "passthrough" or op == "_weight_norm" or _shifted(user, op, value)):
                stack.append((user, transposed, indexed, odd))
            elif first is value and flow == "transpose":
                swap = _swaps_last_two(user, op, len(shape) - (1 if indexed else 0))
                stack.append((user, transposed ^ bool(swap), indexed,
                              odd or ("" if swap is not None else f"unsupported {op}")))
            elif first is value and flow == "index":
                stack.append((user, transposed, True, odd))
            else:
                args = ops.arguments(user)
                found.append((Use(user, op, ops.key_of(args, value), args, shape, transposed,
                                  indexed, conv_mode, split_packed), odd))
    found.sort(key=lambda u: _order(u[0].node))
    return found


def _shifted(node: fx.Node, op: str, value: fx.Node) -> bool:
    """`w + 1`, `1 - w`: a parameter shifted by a constant keeps its role (a gain `x·(1 + w)`)."""
    if op not in ("add", "sub", "rsub"):
        return False
    others = [a for a in (*node.args, *node.kwargs.values()) if a is not value]
    return bool(others) and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in others)


def _order(node: fx.Node) -> int:
    """Position of a node in its graph (fx keeps nodes in execution order)."""
    idx = node.meta.get("_normgraph_order")
    if idx is None:
        for i, n in enumerate(node.graph.nodes):
            n.meta["_normgraph_order"] = i
        idx = node.meta["_normgraph_order"]
    return idx


def _swaps_last_two(node: fx.Node, op: str, ndim: int) -> bool | None:
    """True/False if `node` swaps/keeps the last two dims; None if it permutes otherwise."""
    if op == "t":
        return True
    if op == "numpy_T":  # reverses every dim: a swap of the last two only for a matrix
        return True if ndim == 2 else None
    a = ops.arguments(node)
    if op in ("transpose", "swapaxes"):
        d0, d1 = ops.arg(a, "dim0", 1), ops.arg(a, "dim1", 2)
        if not isinstance(d0, int) or not isinstance(d1, int):
            return None
        pair = {d0 % ndim, d1 % ndim} if ndim else set()
        return True if pair == {ndim - 2, ndim - 1} else (False if d0 % ndim == d1 % ndim else None)
    if op == "permute":
        dims = ops.arg(a, "dims", 1)
        if isinstance(dims, (list, tuple)) and len(dims) == ndim:
            dims = [d % ndim for d in dims]
            if dims == list(range(ndim)):
                return False
            if dims == list(range(ndim - 2)) + [ndim - 1, ndim - 2]:
                return True
    return None


def classify(cap: Captured, trainable: Mapping[str, torch.Tensor], conv_mode: str,
             split_packed: bool) -> dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]]:
    """Each parameter's (atom spec, consuming node, use) per use; an empty list if never
    reached. The use is None inside an opaque module."""
    found: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]] = {name: [] for name in trainable}
    for node, name in cap.params.items():
        if name not in trainable:  # an empty parameter: nothing to update
            continue
        shape = tuple(trainable[name].shape)
        for use, odd in _uses_of(node, shape, cap.modules, conv_mode, split_packed):
            rule = ATOM_RULES.get(use.op)
            spec = None if odd or rule is None else rule(use)
            if spec is None:
                if odd:
                    why = f"reaches {use.op} (node {use.node.name}) through an {odd}"
                elif rule is None:
                    why = f"used by {use.op} (node {use.node.name}), which has no atom rule"
                else:
                    why = f"used by {use.op} (node {use.node.name}) as argument {use.key!r}, which its rule does not cover"
                spec = AtomSpec("fallback", note=why)
            found[name].append((spec, use.node, use))
    for node in cap.graph.nodes:  # opaque (leaf) modules own their parameters' rules
        if node.op != "call_module":
            continue
        mod = cap.modules[str(node.target)]
        entry = module_entry(mod)
        specs = entry.rule(mod, conv_mode) if entry is not None else {}
        for local, p in mod.named_parameters():
            name = f"{node.target}.{local}"
            if name in found:
                spec = specs.get(local) or AtomSpec(
                    "fallback", note=f"inside opaque module {type(mod).__name__}, which has no rule for it")
                found[name].append((spec, node, None))
    return found


def _choose(name: str, specs: list[tuple[AtomSpec, fx.Node, Use | None]], override: str | None) -> AtomSpec:
    """The spec a (possibly shared) parameter takes: the override's kind, else its first use's."""
    if override is None:
        return specs[0][0]
    for spec, _, _ in specs:
        if spec.kind == override:
            return spec
    if not is_orthogonalized(override):  # needs no matrix view: any use will do
        return AtomSpec(override, note=f"kind set by the user ({override})")
    raise ValueError(f"kinds[{name!r}] = {override!r}, but no use of {name} is a {override} "
                     f"(its uses: {', '.join(f'{s.kind} in {n.name}' for s, n, _ in specs)})")


def _graph_atoms(trainable: Mapping[str, torch.Tensor],
                 uses: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]], D: dict[fx.Node, float],
                 kinds: Mapping[str, str], diag: Diagnostics, scales: Scales | None = None) -> dict[str, Atom]:
    """One atom per parameter; its downstream is the sum over its uses of D(use's output),
    each times (in the "scale" mode) the scale of what the parameter multiplies there."""
    atoms: dict[str, Atom] = {}
    for name, p in trainable.items():
        specs = uses[name]
        if not specs:  # unused: no share of the mass (the others' budgets must not shrink)
            atoms[name] = _atom(name, p, AtomSpec("fallback", note="never used by the captured graph"), 1.0, [])
            atoms[name].mass = 0.0
            diag.unreached.append(name)
            continue
        spec = _choose(name, specs, kinds.get(name))
        d = _combine([D[n] * (atom_gain(u, spec.kind, scales) if scales is not None and u is not None else 1.0)
                      for _, n, u in specs], scales.p_of_tied() if scales is not None else 1.0)
        nodes = [n.name for _, n, _ in specs]
        if len(specs) > 1:
            diag.tied[name] = [f"{s.kind} ({n.name})" for s, n, _ in specs]
            spec = AtomSpec(spec.kind, spec.fan_in, spec.fan_out, spec.options,
                            f"{spec.note}; shared by {len(specs)} ops: norm of the "
                            f"{'first use' if name not in kinds else 'kind set in kinds='}, D combined over its uses")
        if spec.kind == "fallback":
            diag.fallbacks[name] = f"{spec.note}; {FALLBACK_NOTE}"
        if d == 0.0:  # used, but no bond rule sees a path to an output: downstream taken as 1
            diag.unreached.append(name)
            d = 1.0
        atoms[name] = _atom(name, p, spec, d, nodes)
    return atoms


def _combine(values: list[float], p: float) -> float:
    """A tied parameter's downstream over its uses: the sum (p = 1) or the ℓp sum."""
    return sum(v ** p for v in values) ** (1.0 / p)


def _module_atoms(model: torch.nn.Module, trainable: Mapping[str, torch.Tensor], conv_mode: str,
                  diag: Diagnostics) -> dict[str, Atom]:
    """Atoms from the modules that own parameters (no graph: every downstream is 1)."""
    atoms: dict[str, Atom] = {}
    for mod_name, mod in model.named_modules():
        entry = module_entry(mod)
        specs = entry.rule(mod, conv_mode) if entry is not None else {}
        for local, p in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{local}" if mod_name else local
            if name not in trainable or name in atoms:
                continue
            spec = specs.get(local)
            if spec is None:
                spec = AtomSpec("fallback", note=f"{type(mod).__name__} has no module rule")
                diag.fallbacks[name] = f"{spec.note}; {FALLBACK_NOTE}"
            atoms[name] = _atom(name, p, spec, 1.0, [])
    for name, p in trainable.items():  # parameters of opaque modules' children, in order
        if name not in atoms:
            atoms[name] = _atom(name, p, AtomSpec("fallback", note="no module rule"), 1.0, [])
            diag.fallbacks[name] = f"no module rule; {FALLBACK_NOTE}"
    return {n: atoms[n] for n in trainable}


def _atom(name: str, p: torch.Tensor, spec: AtomSpec, d: float, uses: list[str]) -> Atom:
    return Atom(name=name, kind=spec.kind, shape=tuple(p.shape), dtype=str(p.dtype).replace("torch.", ""),
                norm=kind_of(spec.kind).norm, mass=kind_of(spec.kind).mass,
                sensitivity=1.0, downstream=d, dual=kind_of(spec.kind).dual,
                fan_in=spec.fan_in, fan_out=spec.fan_out, options=dict(spec.options),
                uses=uses, note=spec.note)


def _check_kinds(kinds: Mapping[str, str], trainable: Mapping[str, torch.Tensor]) -> None:
    unknown = [k for k in kinds if k not in trainable]
    if unknown:
        raise ValueError(f"kinds= names no trainable parameter: {', '.join(unknown)}")


# ---------------------------------------------------------------------------------------
# 3. Masses and 4. budgets


def apply_masses(atoms: dict[str, Atom], masses: Mapping[str, float]) -> None:
    """Set each key's total mass over the atoms it governs (the longest matching key wins)."""
    if not masses:
        return
    governed: dict[str, list[Atom]] = {k: [] for k in masses}
    for atom in atoms.values():
        best = None
        for key in masses:
            if atom.name == key or atom.name.startswith(key + ".") or key == "":
                if best is None or len(key) > len(best):
                    best = key
        if best is not None:
            governed[best].append(atom)
    empty = [k for k, v in governed.items() if not v]
    if empty:
        names = sorted({a.name.rsplit(".", 1)[0] for a in atoms.values()})
        raise ValueError(f"masses key(s) {', '.join(map(repr, empty))} match no trainable parameter "
                         f"(keys are module-name prefixes or parameter names; modules with "
                         f"parameters: {', '.join(names[:12])}{' …' if len(names) > 12 else ''})")
    for key, group in governed.items():
        total = float(masses[key])
        if not (math.isfinite(total) and total >= 0):
            raise ValueError(f"masses[{key!r}] = {total}: masses must be finite and non-negative")
        own = sum(a.mass for a in group)
        for a in group:
            a.mass = total * a.mass / own if own > 0 else total / len(group)


def _budgets(atoms: dict[str, Atom]) -> None:
    total = sum(a.mass for a in atoms.values())
    if total <= 0:
        raise ValueError("the total mass is 0: at least one atom needs a positive mass")
    for a in atoms.values():
        a.budget = budget_of(a.mass, total, a.downstream, a.budget_scale)


#: Largest/smallest budget among matrix and embedding atoms above which analysis warns. At a
#: ratio of 1e4 the smallest atom moves 1e-4 as far as the largest per step: with lr set for
#: the largest it takes ~10⁴ steps to move it by its own norm, i.e. it is frozen in practice.
SPREAD_WARNING = 1e4


def _warn_spread(atoms: dict[str, Atom], cap: Captured, D: dict[fx.Node, float],
                 scales: Scales | None, diag: Diagnostics) -> None:
    """Warn (and note in diagnostics) when budgets span more than `SPREAD_WARNING`, naming
    the ops along the smallest atom's path to the output that amplify its downstream most."""
    weights = [a for a in atoms.values() if a.dual in ("orthogonalize", "row_normalize") and a.budget > 0]
    if len(weights) < 2:
        return
    lo = min(weights, key=lambda a: a.budget)
    hi = max(weights, key=lambda a: a.budget)
    if hi.budget / lo.budget <= SPREAD_WARNING:
        return
    by_name = {n.name: n for n in cap.graph.nodes}
    start = by_name.get(lo.uses[0]) if lo.uses else None
    steps = _amplifying_path(start, cap, D, scales) if start is not None else []
    where = (" Along its path to the output the downstream grows most at: " + ", ".join(steps)
             if steps else "")
    msg = (f"budgets span {hi.budget / lo.budget:.3g}× ({lo.name} {lo.budget:.3g} vs {hi.name} "
           f"{hi.budget:.3g}): {lo.name} will barely move.{where}. If the model scales its residual "
           "branches by hand, check sensitivity= (\"hybrid\", the default, and \"scale\" read plain "
           "x + f(x) streams); set masses= to rebalance.")
    diag.notes.append("warning: " + msg)
    warnings.warn("normgraph: " + msg, stacklevel=3)


def _amplifying_path(start: fx.Node, cap: Captured, D: dict[fx.Node, float],
                     scales: Scales | None, limit: int = 6) -> list[str]:
    """Follow the largest contribution to D from `start` to the output; name the ops where
    D drops most going forward (i.e. where the backward path sum multiplies)."""
    node, seen, gains = start, set(), []
    while node is not None and node.op != "output" and node not in seen:
        seen.add(node)
        best, best_c = None, 0.0
        for user in node.users:
            if user.op == "output":
                continue
            args = ops.arguments(user)
            s, _ = _bond(BondInput(user, ops.op_name(user, cap.modules), ops.key_of(args, node), args, node), scales)
            if s * D[user] > best_c:
                best, best_c = user, s * D[user]
        if best is not None and D[best] > 0 and D[node] / D[best] > 1.5:
            gains.append((D[node] / D[best], f"{best.name} ({ops.op_name(best, cap.modules)}, ×{D[node] / D[best]:.2g})"))
        node = best
    gains.sort(key=lambda g: -g[0])
    return [g[1] for g in gains[:limit]]


# ---------------------------------------------------------------------------------------
# The networkx view


def _atom_attrs(atom: Atom) -> dict[str, Any]:
    return {"type": "atom", "kind": atom.kind, "norm": atom.norm, "shape": atom.shape,
            "mass": atom.mass, "sensitivity": atom.sensitivity, "downstream": atom.downstream,
            "budget": atom.budget}


def _to_networkx(cap: Captured, D: dict[fx.Node, float],
                 uses: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]],
                 scales: Scales | None = None) -> nx.DiGraph:
    """Ops that carry activations (D > 0), edges labelled with sensitivities, atoms → their ops."""
    g = nx.DiGraph()
    keep = {n for n in cap.graph.nodes if D[n] > 0 and n not in cap.params and n.op != "get_attr"}
    for n in keep:
        g.add_node(n.name, type="op", op=ops.op_name(n, cap.modules), downstream=D[n],
                   **({"scale": scales(n)} if scales is not None else {}))
    for n in keep:
        if n.op in ("placeholder", "output"):
            continue
        entry = module_entry(cap.modules[str(n.target)]) if n.op == "call_module" else None
        args = ops.arguments(n) if entry is None else {}
        for key, inp in ops.tensor_inputs(n):
            if inp in keep:
                s = entry.sensitivity if entry is not None else _bond(
                    BondInput(n, g.nodes[n.name]["op"], ops.key_of(args, inp), args, inp), scales)[0]
                g.add_edge(inp.name, n.name, sensitivity=s)
    for name, specs in uses.items():
        for _, node, _ in specs:
            if node.name not in g:
                g.add_node(node.name, type="op", op=ops.op_name(node, cap.modules), downstream=D[node])
            g.add_edge(name, node.name)
    return g
