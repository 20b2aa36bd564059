"""Export a `NormGraph`: annotated ONNX, GraphML, node-link JSON, DOT, SVG/PNG.

ONNX layout (see docs/annotations.md): every annotated parameter's fields sit in the
`metadata_props` of its initializer (``TensorProto.metadata_props``, IR version ≥ 10) under
``normgraph.<field>``; model-level `metadata_props` hold the schema, the totals, the
diagnostics and the op graph. Netron does not display initializer metadata, so a one-line
summary also goes on each node that consumes the parameter (Netron shows node metadata).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import networkx as nx

from . import annotations
from .normgraph import Atom, NormGraph

ONNX_PREFIX = "normgraph."
MIN_IR_VERSION = 10  # first IR version with TensorProto.metadata_props
#: Atom fields stored as raw strings in ONNX metadata; the others are JSON-encoded.
_STRING_FIELDS = frozenset(f.name for f in dataclasses.fields(Atom) if f.type == "str")


# ---------------------------------------------------------------- ONNX

def export_onnx(model: Any, example_inputs: Sequence[Any] | Any, path: str | Path, *,
                example_kwargs: dict[str, Any] | None = None, norm_graph: NormGraph | None = None,
                optimize: bool = False, onnx_kwargs: dict[str, Any] | None = None,
                **analyze_kwargs: Any) -> Path:
    """Export `model` with ``torch.onnx.export(..., dynamo=True)`` and write the annotations into it.

    `norm_graph` defaults to ``normgraph.analyze(model, example_inputs, example_kwargs,
    **analyze_kwargs)``. `optimize` is off by default because the ONNX optimizer folds and
    renames parameters (fused BatchNorm, transposed/deduplicated weights), which leaves
    atoms with no initializer to sit on; they are then kept in the model-level metadata.
    """
    import torch

    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if norm_graph is None:
        from .analyze import analyze
        norm_graph = analyze(model, tuple(example_inputs), example_kwargs, **analyze_kwargs)
    program = torch.onnx.export(model, tuple(example_inputs), kwargs=example_kwargs or None,
                                dynamo=True, optimize=optimize, verbose=False, **(onnx_kwargs or {}))
    annotate_ir_model(program.model, norm_graph, model, program.exported_program)
    path = Path(path)
    program.save(path)
    return path


def _torch_names(model: Any, exported_program: Any) -> tuple[dict[str, str], dict[str, str]]:
    """(every parameter name → the canonical `named_parameters()` name, export placeholder → name)."""
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[name] = canonical.setdefault(id(p), name)
    placeholders: dict[str, str] = {}
    if exported_program is not None:
        placeholders = dict(exported_program.graph_signature.inputs_to_parameters)
    return aliases, placeholders


def annotate_ir_model(ir_model: Any, ng: NormGraph, model: Any, exported_program: Any = None) -> None:
    """Write `ng` into an onnx_ir model produced by torch's exporter (in place).

    Initializers are matched to parameters by name, then through the exporter's own record
    of the placeholder it came from (``pkg.torch.onnx.original_node_name`` →
    ``graph_signature.inputs_to_parameters``), then through tied-parameter aliases.
    """
    aliases, placeholders = _torch_names(model, exported_program)
    placed: set[str] = set()
    for init_name, value in ir_model.graph.initializers.items():
        torch_name = aliases.get(init_name)
        if torch_name is None:
            source = placeholders.get(value.metadata_props.get("pkg.torch.onnx.original_node_name", ""))
            torch_name = aliases.get(source or "", source)
        atom = ng.atoms.get(torch_name or "") or ng.atoms.get(init_name)
        if atom is None or value.const_value is None:
            continue
        value.const_value.metadata_props.update(atom_metadata(atom))
        placed.add(atom.name)
        summary = (f"{atom.kind} {atom.norm}, mass {atom.mass:.4g}, budget {atom.budget:.4g}, "
                   f"dual {atom.dual}")
        for node, _ in value.uses():
            node.metadata_props[f"{ONNX_PREFIX}{atom.name}"] = summary
    ir_model.ir_version = max(ir_model.ir_version or 0, MIN_IR_VERSION)
    ir_model.metadata_props.update(model_metadata(ng, placed))


def atom_metadata(atom: Atom) -> dict[str, str]:
    """One ``normgraph.<field>`` entry per Atom field: strings raw (readable), the rest JSON."""
    return {ONNX_PREFIX + k: (v if k in _STRING_FIELDS else json.dumps(v, ensure_ascii=False))
            for k, v in annotations.atom_to_dict(atom).items()}


def model_metadata(ng: NormGraph, placed: set[str]) -> dict[str, str]:
    doc = annotations.to_dict(ng)
    meta = {
        ONNX_PREFIX + "schema": doc["schema"],
        ONNX_PREFIX + "total_mass": json.dumps(doc["totals"]["total_mass"]),
        ONNX_PREFIX + "atoms": json.dumps(doc["totals"]["atoms"]),
        ONNX_PREFIX + "atom_order": json.dumps(list(ng.atoms), ensure_ascii=False),
        ONNX_PREFIX + "diagnostics": json.dumps(doc["diagnostics"], ensure_ascii=False),
        ONNX_PREFIX + "graph": json.dumps(doc["graph"], ensure_ascii=False),
    }
    for item in doc["atoms"]:  # parameters the ONNX graph has no initializer for
        if item["name"] not in placed:
            meta[f"{ONNX_PREFIX}atom:{item['name']}"] = json.dumps(item, ensure_ascii=False)
    return meta


def read_onnx_annotations(path: str | Path) -> NormGraph:
    """Read the annotations `export_onnx` wrote back into a `NormGraph` (validated like `load`)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    where = f"{path}: "
    if ONNX_PREFIX + "schema" not in meta:
        raise annotations.AnnotationError(f"{where}no normgraph annotations (model metadata_props "
                                          f"has no {ONNX_PREFIX}schema)")
    found: dict[str, dict[str, Any]] = {}
    for init in proto.graph.initializer:
        props = {p.key[len(ONNX_PREFIX):]: p.value for p in init.metadata_props
                 if p.key.startswith(ONNX_PREFIX)}
        if props:
            item = {k: (v if k in _STRING_FIELDS else _json(v, where, f"initializer {init.name!r}: {k}"))
                    for k, v in props.items()}
            found[item.get("name", init.name)] = item
    for key, value in meta.items():
        if key.startswith(ONNX_PREFIX + "atom:"):
            found[key[len(ONNX_PREFIX + "atom:"):]] = _json(value, where, key)
    order = _json(meta.get(ONNX_PREFIX + "atom_order", "null"), where, "atom_order") or list(found)
    missing = [n for n in order if n not in found]
    if missing:
        raise annotations.AnnotationError(f"{where}no annotations for {', '.join(missing)} "
                                          f"(listed in {ONNX_PREFIX}atom_order)")
    doc = {
        "schema": meta[ONNX_PREFIX + "schema"],
        "totals": {"total_mass": _json(meta.get(ONNX_PREFIX + "total_mass", "null"), where, "total_mass"),
                   "atoms": _json(meta.get(ONNX_PREFIX + "atoms", str(len(order))), where, "atoms")},
        "atoms": [found[n] for n in order],
        "diagnostics": _json(meta.get(ONNX_PREFIX + "diagnostics", "{}"), where, "diagnostics"),
        "graph": _json(meta.get(ONNX_PREFIX + "graph", "null"), where, "graph"),
    }
    if doc["totals"]["total_mass"] is None:
        del doc["totals"]["total_mass"]
    return annotations.from_dict(doc, where)


def _json(text: str, where: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise annotations.AnnotationError(f"{where}{what}: not valid JSON ({e})") from None


# ---------------------------------------------------------------- graph formats

def _plain(value: Any) -> Any:
    """GraphML takes only str/int/float/bool: None becomes "", containers become JSON."""
    if value is None:
        return ""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def graphml_graph(ng: NormGraph) -> nx.DiGraph:
    g = nx.DiGraph()
    g.graph.update({k: _plain(v) for k, v in ng.graph.graph.items()})
    g.add_nodes_from((str(n), {k: _plain(v) for k, v in d.items()}) for n, d in ng.graph.nodes(data=True))
    g.add_edges_from((str(u), str(v), {k: _plain(x) for k, x in d.items()})
                     for u, v, d in ng.graph.edges(data=True))
    return g


def write_graphml(ng: NormGraph, path: str | Path) -> Path:
    """GraphML (yEd, Gephi, Cytoscape); tuples such as shapes are written as JSON strings."""
    nx.write_graphml(graphml_graph(ng), str(path))
    return Path(path)


def write_node_link(ng: NormGraph, path: str | Path) -> Path:
    """networkx node-link JSON (d3.js, ``nx.node_link_graph``)."""
    data = nx.node_link_data(ng.graph, edges="edges")
    Path(path).write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n",
                          encoding="utf-8")
    return Path(path)


def write_dot(ng: NormGraph, path: str | Path) -> Path:
    Path(path).write_text(ng.to_dot() + "\n", encoding="utf-8")
    return Path(path)


def draw(ng: NormGraph, path: str | Path, engine: str = "auto") -> Path:
    """Render the graph by suffix (.svg, .png, .pdf; .dot writes DOT text).

    `engine`: "dot" (Graphviz, best layout), "matplotlib" (layered layout from the
    topological order), or "auto" (dot if installed, else matplotlib).
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt in ("dot", "gv"):
        return write_dot(ng, path)
    if fmt not in ("svg", "png", "pdf"):
        raise ValueError(f"cannot draw to {path.name!r}: use a .svg, .png, .pdf or .dot file")
    if engine == "auto":
        engine = "dot" if shutil.which("dot") else "matplotlib"
    if engine == "dot":
        if not shutil.which("dot"):
            raise RuntimeError("Graphviz `dot` is not installed (apt-get install graphviz)")
        subprocess.run(["dot", f"-T{fmt}", "-o", str(path)], input=ng.to_dot(), text=True,
                       check=True, capture_output=True)
        return path
    if engine != "matplotlib":
        raise ValueError(f"unknown engine {engine!r} (auto, dot, matplotlib)")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("cannot draw: neither Graphviz `dot` nor matplotlib is installed "
                           "(apt-get install graphviz, or pip install matplotlib; "
                           "or write a .dot file)") from None
    return _draw_matplotlib(ng, path, fmt, Figure, FigureCanvasAgg)


def layers(graph: nx.DiGraph) -> dict[Any, int]:
    """Column of each node, left to right: ops by topological generation (odd columns), each
    atom in the even column just before its first consumer, so atoms sit next to their ops."""
    ops = graph.subgraph(n for n, d in graph.nodes(data=True) if d.get("type") != "atom")
    if nx.is_directed_acyclic_graph(ops):
        gen = {n: i for i, g in enumerate(nx.topological_generations(ops)) for n in g}
    else:  # cycles should not happen; fall back to BFS depth from the in-degree-0 nodes
        gen = {}
        for comp in nx.weakly_connected_components(ops):
            root = min(comp, key=ops.in_degree)
            gen.update(nx.single_source_shortest_path_length(ops.to_undirected(as_view=True), root))
    out = {n: 2 * i + 1 for n, i in gen.items()}
    for n in graph:
        if n not in out:
            out[n] = 2 * min((gen[s] for s in graph.successors(n) if s in gen), default=0)
    return out


def _draw_matplotlib(ng: NormGraph, path: Path, fmt: str, Figure: Any, Canvas: Any) -> Path:
    g = ng.graph
    layer = layers(g)
    columns: dict[int, list[Any]] = {}
    for n, i in sorted(layer.items(), key=lambda t: t[1]):
        columns.setdefault(i, []).append(n)
    pos = nx.multipartite_layout(g, subset_key=columns, align="vertical") if len(g) else {}
    width = len(set(layer.values()))
    height = max(Counter(layer.values()).values(), default=1)
    fig = Figure(figsize=(min(4 + 1.6 * width, 200), min(3 + 0.6 * height, 200)))
    Canvas(fig)
    ax = fig.add_subplot()
    ax.set_axis_off()
    atoms = [n for n, d in g.nodes(data=True) if d.get("type") == "atom"]
    ops = [n for n in g if n not in set(atoms)]
    labels = {}
    for n, d in g.nodes(data=True):
        if d.get("type") == "atom":
            labels[n] = f"{n}\n{d.get('kind', '')} budget {float(d.get('budget') or 0):.3g}"
        else:
            labels[n] = f"{d.get('op', n)}\nD={float(d.get('downstream') or 0):.3g}"
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=8, edge_color="#888888", width=0.8)
    nx.draw_networkx_nodes(g, pos, nodelist=ops, ax=ax, node_color="white", edgecolors="black",
                           node_size=300)
    nx.draw_networkx_nodes(g, pos, nodelist=atoms, ax=ax, node_color="lightblue", node_shape="s",
                           edgecolors="black", node_size=300)
    nx.draw_networkx_labels(g, pos, labels=labels, ax=ax, font_size=6)
    fig.savefig(path, format=fmt, bbox_inches="tight")
    return path


#: `normgraph export --format` → writer. "json" is the annotations file (`annotations.save`).
GRAPH_WRITERS = {
    "json": annotations.save,
    "graphml": write_graphml,
    "nodelink": write_node_link,
    "dot": write_dot,
    "svg": draw,
    "png": draw,
    "pdf": draw,
}
