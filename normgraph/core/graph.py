"""The analysis result: one atom per trainable parameter, plus the op graph they live in.

`NormGraph` is plain data: the analysis pass (`normgraph.analyze`) builds it, the codegen
pass reads it, and the io passes serialise it. Nothing here traces, computes norms of
tensors or touches files (`save`/`draw` call the writers `normgraph.io` installs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import networkx as nx

from .kinds import kind_of

#: File writers, installed by `normgraph.io` when the package loads ("save" → annotations JSON,
#: "draw" → SVG/PNG). The data layer itself imports no I/O: `NormGraph.save` looks its writer
#: up here (dependency inversion, so no module below io imports io).
WRITERS: dict[str, Callable[..., Path]] = {}


def budget_of(mass: float, total_mass: float, downstream: float, scale: float = 1.0) -> float:
    """An atom's share of the update's norm: its mass share over what amplifies it downstream
    (modula's target_norm at T=1), times `scale` (1 but for a residual body's atoms, whose
    shares are read in quadrature and depth-flat: `Atom.budget_scale`). The one place this
    formula lives."""
    if total_mass <= 0 or downstream <= 0:
        return 0.0
    return mass / total_mass / downstream * scale


@dataclass
class Atom:
    """One trainable parameter as the modular norm sees it.

    `options` carries what the duality map needs, all JSON-serialisable. For the
    orthogonalised kinds (linear, conv, expert) it holds the *matrix view*:
    ``tensor.reshape(pre_shape).permute(perm).reshape(matrix)`` is a batch of
    ``matrix = [B, fan_out, fan_in]`` matrices, and ``norm_scale`` the factor in front of
    the max over that batch (K kernel positions for a conv, else 1).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    norm: str = ""
    mass: float = 1.0
    sensitivity: float = 1.0
    downstream: float = 1.0
    budget: float = 0.0
    #: Factor on the budget, 1 outside a plain residual body. Inside it: √(n_eff / n_ref) (the
    #: body's changes add in quadrature) times D(the atom's branch output) / D̄ (the body read
    #: depth-flat); `normgraph.analysis.analyze`, rules 5 and 7.
    budget_scale: float = 1.0
    #: Decoupled weight decay `compile(weight_decay="auto")` gives this atom: `BODY_DECAY`
    #: for the matrices inside residual branches (and one reading the unnormalised stream), else 0.
    decay: float = 0.0
    dual: str = ""
    fan_in: int | None = None
    fan_out: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    uses: list[str] = field(default_factory=list)
    note: str = ""

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if not self.norm:
            self.norm = kind_of(self.kind).norm
        if not self.dual:
            self.dual = kind_of(self.kind).dual


@dataclass
class Diagnostics:
    """What the analysis could not do exactly, so that nothing falls back silently."""

    frontend: str = ""
    trace_errors: dict[str, str] = field(default_factory=dict)
    assumed_ops: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)
    tied: dict[str, list[str]] = field(default_factory=dict)
    unreached: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"front end: {self.frontend}"]
        for name, err in self.trace_errors.items():
            out.append(f"  tried {name}: failed: {err}")
        if self.assumed_ops:
            ops = ", ".join(f"{op}×{n}" for op, n in sorted(self.assumed_ops.items()))
            out.append(f"assumed sensitivity 1 (no rule): {ops}")
        for name, why in self.fallbacks.items():
            out.append(f"fallback norm for {name}: {why}")
        for name, uses in self.tied.items():
            out.append(f"tied parameter {name}: used by {', '.join(uses)}")
        if self.unreached:
            out.append(f"not reaching the output (unused ones have mass 0; used ones downstream 1): "
                       f"{', '.join(self.unreached)}")
        out.extend(self.notes)
        return out


@dataclass
class NormGraph:
    """Atoms keyed by `named_parameters()` name, the op/atom graph, and diagnostics."""

    atoms: dict[str, Atom]
    graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    diagnostics: Diagnostics = field(default_factory=Diagnostics)

    @property
    def total_mass(self) -> float:
        return sum(a.mass for a in self.atoms.values())

    def table(self) -> str:
        """The per-parameter table (parameter, kind, shape, norm, mass, downstream, budget, and
        decay where the analysis gave some atom one)."""
        decays = any(a.decay for a in self.atoms.values())  # the column only where some atom decays
        head = ("parameter", "kind", "shape", "norm", "mass", "downstream", "budget") + (("decay",) if decays else ())
        rows = [head]
        for a in self.atoms.values():
            rows.append((a.name, a.kind, "×".join(map(str, a.shape)), a.norm,
                         f"{a.mass:.4g}", f"{a.downstream:.4g}", f"{a.budget:.4g}")
                        + ((f"{a.decay:g}",) if decays else ()))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*rows[0]), "  ".join("-" * w for w in widths)]
        lines += [fmt.format(*r) for r in rows[1:]]
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: atoms by kind, the budget range, and how many ops had to be assumed."""
        kinds: dict[str, int] = {}
        for a in self.atoms.values():
            kinds[a.kind] = kinds.get(a.kind, 0) + 1
        by_kind = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
        budgets = [a.budget for a in self.atoms.values() if a.budget > 0]
        assumed = sum(self.diagnostics.assumed_ops.values())
        line = f"{len(self.atoms)} atoms ({by_kind})"
        if budgets:
            lo, hi = min(budgets), max(budgets)
            line += f"; budgets {lo:.3g} … {hi:.3g} (smallest/largest {lo / hi:.3g})"
        return line + f"; {assumed} op(s) with assumed sensitivity"

    def __str__(self) -> str:
        return "\n".join([self.summary(), "", self.table(), "", f"total mass: {self.total_mass:.4g}",
                          *self.diagnostics.lines()])

    def __repr__(self) -> str:
        return f"NormGraph({len(self.atoms)} atoms, frontend={self.diagnostics.frontend!r})"

    def to_dot(self) -> str:
        """Graphviz DOT of the op/atom graph: atoms as boxes labelled with kind and budget."""
        def q(s: Any) -> str:
            return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'

        lines = ["digraph normgraph {", "  rankdir=LR;", "  node [fontsize=10];"]
        for node, data in self.graph.nodes(data=True):
            if data.get("type") == "atom":
                label = f"{node}\\n{data.get('kind')} {data.get('norm')}\\nbudget {data.get('budget', 0):.3g}"
                lines.append(f"  {q(node)} [shape=box, style=filled, fillcolor=lightblue, label={q(label)}];")
            else:
                label = f"{data.get('op', node)}\\nD={data.get('downstream', 0):.3g}"
                lines.append(f"  {q(node)} [shape=ellipse, label={q(label)}];")
        for u, v, data in self.graph.edges(data=True):
            s = data.get("sensitivity")
            attr = f" [label={q(f'{s:.3g}')}]" if isinstance(s, (int, float)) else ""
            lines.append(f"  {q(u)} -> {q(v)}{attr};")
        lines.append("}")
        return "\n".join(lines)

    def draw(self, path: str | Path) -> Path:
        """Render the graph to SVG or PNG (by suffix) with the `dot` program, else matplotlib."""
        return _writer("draw")(self, path)

    def save(self, path: str | Path) -> Path:
        """Write the annotations as versioned JSON (see `normgraph.load`)."""
        return _writer("save")(self, path)


def _writer(what: str) -> Callable[..., Path]:
    if what not in WRITERS:  # only if someone imported normgraph.core alone and bypassed the package
        raise RuntimeError(f"no {what!r} writer is installed; import normgraph (normgraph.io installs it)")
    return WRITERS[what]
