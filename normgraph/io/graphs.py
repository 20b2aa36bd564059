"""The norm graph in graph formats: GraphML, node-link JSON, DOT, and drawings (SVG/PNG/PDF).

Drawing uses Graphviz's `dot` program when it is installed, else matplotlib.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import networkx as nx

from ..core.graph import NormGraph
from .annotations import save

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
    "json": save,
    "graphml": write_graphml,
    "nodelink": write_node_link,
    "dot": write_dot,
    "svg": draw,
    "png": draw,
    "pdf": draw,
}
