"""Versioned JSON annotations: save a `NormGraph`, hand-edit masses, load it back.

The file is the contract between the analysis and the optimizer: `normgraph.compile(...,
annotations=path)` builds the optimizer from it without tracing. So loading re-derives
nothing from the model; it validates every field (naming the bad one) and recomputes only
the budgets, because those are derived from the masses the user may have edited.
See docs/annotations.md for the field table.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable

import networkx as nx

from ..core.graph import Atom, Diagnostics, NormGraph, budget_of
from ..core.layout import view_problem

SCHEMA = "normgraph.annotations/1"
#: Atom fields a file must have; the others default as in `Atom`.
REQUIRED_ATOM_FIELDS = ("name", "kind", "shape", "dtype", "mass", "downstream", "dual")
_REL_TOL = 1e-9  # a stored budget this close to the recomputed one is kept as is (exact round trip)


class AnnotationError(ValueError):
    """A field of an annotations file is missing, unknown or of the wrong type."""


# ---------------------------------------------------------------- budgets

def recompute_budgets(ng: NormGraph, stored_total: float | None = None, where: str = "") -> None:
    """Set every budget to ``mass / total_mass / downstream × budget_scale`` (those authoritative).

    A stored budget within 1e-9 (relative) of that value is kept bit-for-bit, so an
    unedited file round-trips exactly. If budgets disagree while the masses still add up to
    the stored total, someone edited a budget by hand: that has no effect, so warn.
    """
    total = ng.total_mass
    if ng.atoms and total <= 0:
        raise AnnotationError(f"{where}atoms[].mass: the masses add up to {total}; at least one "
                              "parameter needs a positive mass")
    changed = []
    for atom in ng.atoms.values():
        want = budget_of(atom.mass, total, atom.downstream, atom.budget_scale)
        if not math.isclose(atom.budget, want, rel_tol=_REL_TOL, abs_tol=0.0):
            changed.append(atom.name)
            atom.budget = want
    masses_unedited = stored_total is not None and math.isclose(stored_total, total, rel_tol=_REL_TOL)
    if changed and masses_unedited:
        warnings.warn(f"{where}budget is derived from mass (budget = mass / total_mass / downstream × budget_scale); "
                      f"recomputed the edited budget of {', '.join(changed[:5])}"
                      f"{' …' if len(changed) > 5 else ''}: edit `mass` instead", stacklevel=3)
    for atom in ng.atoms.values():  # keep the graph's atom nodes in step (draw, to_dot)
        if atom.name in ng.graph and ng.graph.nodes[atom.name].get("type") == "atom":
            ng.graph.nodes[atom.name].update(mass=atom.mass, budget=atom.budget)


# ---------------------------------------------------------------- to / from dict

def atom_to_dict(atom: Atom) -> dict[str, Any]:
    d = dataclasses.asdict(atom)
    d["shape"] = list(atom.shape)
    return d


def graph_to_dict(graph: nx.DiGraph) -> dict[str, Any]:
    return nx.node_link_data(graph, edges="edges")


def graph_from_dict(data: dict[str, Any]) -> nx.DiGraph:
    graph = nx.node_link_graph(data, directed=True, multigraph=False, edges="edges")
    for _, attrs in graph.nodes(data=True):
        if isinstance(attrs.get("shape"), list):
            attrs["shape"] = tuple(attrs["shape"])
    return graph


def to_dict(ng: NormGraph, include_graph: bool = True) -> dict[str, Any]:
    """The JSON document (plain dicts/lists) for `ng`."""
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "totals": {"total_mass": ng.total_mass, "atoms": len(ng.atoms)},
        "atoms": [atom_to_dict(a) for a in ng.atoms.values()],
        "diagnostics": dataclasses.asdict(ng.diagnostics),
    }
    if include_graph:
        doc["graph"] = graph_to_dict(ng.graph)
    return doc


def dumps(ng: NormGraph, include_graph: bool = True) -> str:
    """JSON text with one parameter field (or one graph node/edge) per line, for hand-editing."""
    return _format(to_dict(ng, include_graph), "", 3) + "\n"


def _format(value: Any, indent: str, depth: int) -> str:
    """Like ``json.dumps(indent=2)`` but values below `depth` levels stay on one line."""
    inner = indent + "  "
    if depth > 0 and isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_format(v, inner, depth - 1)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if depth > 0 and isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [inner + _format(v, inner, depth - 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return json.dumps(value, ensure_ascii=False)


def save(ng: NormGraph, path: str | Path, include_graph: bool = True) -> Path:
    """Write `ng` as versioned JSON; `load(path)` gives it back (byte-identical on re-save)."""
    path = Path(path)
    path.write_text(dumps(ng, include_graph), encoding="utf-8")
    return path


def loads(text: str, where: str = "") -> NormGraph:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{where}not valid JSON: {e}") from None
    return from_dict(doc, where)


def load(path: str | Path) -> NormGraph:
    """Read annotations written by `NormGraph.save`: validate, then recompute budgets from
    masses. (`normgraph.load` also takes an annotated .onnx file.)"""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AnnotationError(f"{path}: not a JSON annotations file (binary content); an annotated "
                              "ONNX file is read from a path ending in .onnx, or with "
                              "normgraph.read_onnx_annotations") from None
    return loads(text, where=f"{path}: ")


def from_dict(doc: Any, where: str = "") -> NormGraph:
    """Validate `doc` (naming the first bad field) and build the `NormGraph`."""
    _check(isinstance(doc, dict), where, "top level", "a JSON object", doc)
    schema = doc.get("schema")
    if schema != SCHEMA:
        raise AnnotationError(f"{where}schema: expected {SCHEMA!r}, got {schema!r}"
                              + ("" if schema is None else " (written by another normgraph version?)"))
    _no_unknown(doc, {"schema", "totals", "atoms", "diagnostics", "graph"}, where, "")
    totals = doc.get("totals", {})
    _check(isinstance(totals, dict), where, "totals", "an object", totals)
    _no_unknown(totals, {"total_mass", "atoms"}, where, "totals.")
    atoms_doc = doc.get("atoms")
    _check(isinstance(atoms_doc, list), where, "atoms", "a list of parameter objects", atoms_doc)
    atoms: dict[str, Atom] = {}
    for i, item in enumerate(atoms_doc):
        atom = atom_from_dict(item, where, f"atoms[{i}]")
        if atom.name in atoms:
            raise AnnotationError(f"{where}atoms[{i}].name: duplicate parameter {atom.name!r}")
        atoms[atom.name] = atom
    if "atoms" in totals:
        _check(_is_int(totals["atoms"]), where, "totals.atoms", "an integer", totals["atoms"])
        if totals["atoms"] != len(atoms):
            raise AnnotationError(f"{where}totals.atoms: says {totals['atoms']} but the file lists "
                                  f"{len(atoms)} parameters")
    stored_total = totals.get("total_mass")
    if stored_total is not None:
        _check(_is_number(stored_total), where, "totals.total_mass", "a number", stored_total)
    diagnostics = diagnostics_from_dict(doc.get("diagnostics", {}), where)
    graph = nx.DiGraph()
    if doc.get("graph") is not None:
        _check(isinstance(doc["graph"], dict), where, "graph", "a node-link object", doc["graph"])
        try:
            graph = graph_from_dict(doc["graph"])
        except (KeyError, TypeError, ValueError, AttributeError, nx.NetworkXError) as e:
            raise AnnotationError(f"{where}graph: not node-link data ({type(e).__name__}: {e})") from None
    ng = NormGraph(atoms, graph, diagnostics)
    recompute_budgets(ng, stored_total, where)
    return ng


# ---------------------------------------------------------------- field validation

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_opt_int(v: Any) -> bool:
    return v is None or _is_int(v)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _is_shape(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(s) and s >= 0 for s in v)


def _is_finite(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


def _is_nonneg(v: Any) -> bool:
    """A finite number ≥ 0 (JSON's `Infinity` and `NaN` parse, but are no mass)."""
    return _is_finite(v) and v >= 0


#: field → (check, what it must be). Fields the lead adds to `Atom` later accept any JSON value.
ATOM_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "kind": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "shape": (_is_shape, "a list of non-negative integers"),
    "dtype": (lambda v: isinstance(v, str) and v != "", "a dtype name such as 'float32'"),
    "norm": (lambda v: isinstance(v, str), "a string"),
    "mass": (_is_nonneg, "a non-negative number, finite"),
    "sensitivity": (_is_finite, "a number, finite"),
    "downstream": (lambda v: _is_finite(v) and v > 0, "a positive number, finite (budget = mass / total_mass / downstream)"),
    "budget": (_is_finite, "a number, finite"),
    "budget_scale": (lambda v: _is_finite(v) and v > 0, "a positive number, finite (budget = mass / total_mass / downstream × budget_scale)"),
    "decay": (_is_nonneg, "a non-negative number, finite (the weight decay compile(weight_decay='auto') gives it)"),
    "dual": (lambda v: isinstance(v, str) and v != "", "a duality-map name such as 'orthogonalize'"),
    "fan_in": (_is_opt_int, "an integer or null"),
    "fan_out": (_is_opt_int, "an integer or null"),
    "options": (lambda v: isinstance(v, dict), "an object"),
    "uses": (_is_str_list, "a list of strings"),
    "note": (lambda v: isinstance(v, str), "a string"),
}

DIAGNOSTICS_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "frontend": (lambda v: isinstance(v, str), "a string"),
    "trace_errors": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                     "an object of strings"),
    "assumed_ops": (lambda v: isinstance(v, dict) and all(_is_int(x) for x in v.values()),
                    "an object of integers"),
    "fallbacks": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                  "an object of strings"),
    "tied": (lambda v: isinstance(v, dict) and all(_is_str_list(x) for x in v.values()),
             "an object of string lists"),
    "unreached": (_is_str_list, "a list of strings"),
    "notes": (_is_str_list, "a list of strings"),
}


def _check(ok: bool, where: str, field: str, what: str, value: Any) -> None:
    if not ok:
        shown = json.dumps(value, ensure_ascii=False) if _jsonable(value) else repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise AnnotationError(f"{where}{field}: expected {what}, got {shown}")


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _no_unknown(d: dict[str, Any], known: set[str], where: str, prefix: str) -> None:
    unknown = [k for k in d if k not in known]
    if unknown:
        raise AnnotationError(f"{where}{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")


def atom_from_dict(item: Any, where: str = "", at: str = "atom") -> Atom:
    """Validate one parameter object and build its `Atom`."""
    _check(isinstance(item, dict), where, at, "an object", item)
    if isinstance(item.get("name"), str):
        at = f"{at} ({item['name']!r})"
    known = {f.name for f in dataclasses.fields(Atom)}
    _no_unknown(item, known, where, f"{at}.")
    for name in REQUIRED_ATOM_FIELDS:
        if name not in item:
            raise AnnotationError(f"{where}{at}.{name}: missing (required: {', '.join(REQUIRED_ATOM_FIELDS)})")
    for name, value in item.items():
        if name in ATOM_CHECKS:
            check, what = ATOM_CHECKS[name]
            _check(check(value), where, f"{at}.{name}", what, value)
    atom = Atom(**item)
    if "matrix" in atom.options or "parts" in atom.options:  # (a missing view is refused at compile)
        problem = view_problem(atom)
        if problem:
            raise AnnotationError(f"{where}{at}.options: {problem}")
    return atom


def diagnostics_from_dict(item: Any, where: str = "") -> Diagnostics:
    _check(isinstance(item, dict), where, "diagnostics", "an object", item)
    _no_unknown(item, {f.name for f in dataclasses.fields(Diagnostics)}, where, "diagnostics.")
    for name, value in item.items():
        if name in DIAGNOSTICS_CHECKS:
            check, what = DIAGNOSTICS_CHECKS[name]
            _check(check(value), where, f"diagnostics.{name}", what, value)
    return Diagnostics(**item)


# ---------------------------------------------------------------- against a model

def check_against(ng: NormGraph, model: Any) -> None:
    """Raise ValueError listing every mismatch between `ng` and `model.named_parameters()`.

    Why: an annotations file may be stale (model changed since it was written); building an
    optimizer from it would silently mis-scale or skip parameters. Tied parameters match
    under any of their names. Frozen parameters (requires_grad=False) need no atom.
    """
    aliases: dict[str, str] = {}  # any name → the name named_parameters() reports
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[name] = canonical.setdefault(id(p), name)
    params = dict(model.named_parameters())
    problems: list[str] = []
    seen: set[str] = set()
    for atom in ng.atoms.values():
        name = aliases.get(atom.name)
        if name is None:
            problems.append(f"extra parameter {atom.name!r} (in the annotations, not in the model)")
            continue
        seen.add(name)
        p = params[name]
        if tuple(p.shape) != tuple(atom.shape):
            problems.append(f"{atom.name!r}: shape {list(atom.shape)} in the annotations, "
                            f"{list(p.shape)} in the model")
        dtype = str(p.dtype).removeprefix("torch.")
        if dtype != atom.dtype:
            problems.append(f"{atom.name!r}: dtype {atom.dtype} in the annotations, {dtype} in the model")
    for name, p in params.items():
        if name not in seen and p.requires_grad:
            problems.append(f"missing parameter {name!r} (in the model, not in the annotations)")
    if problems:
        raise ValueError(f"annotations do not match the model ({len(problems)} mismatches):\n  "
                         + "\n  ".join(problems))
