"""I/O of norm graphs: versioned JSON annotations, annotated ONNX, graph formats and drawings.

Importing this package installs `NormGraph.save` and `NormGraph.draw`'s writers in the
data layer (`core.graph.WRITERS`), so the data layer itself never imports I/O.
"""
from ..core.graph import WRITERS
from .annotations import AnnotationError, check_against, dumps, load, loads, save
from .graphs import GRAPH_WRITERS, draw, write_dot, write_graphml, write_node_link
from .onnx import read_onnx_annotations, write_onnx

WRITERS["save"] = save
WRITERS["draw"] = draw

__all__ = ["AnnotationError", "check_against", "dumps", "load", "loads", "save", "draw", "GRAPH_WRITERS",
           "write_dot", "write_graphml", "write_node_link", "read_onnx_annotations", "write_onnx"]
