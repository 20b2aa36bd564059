"""normgraph: compile a torch model's modular norm into a duality map and an optimizer.

Pipeline: trace (`trace.capture`) → analyze (`analyze.analyze`) → codegen (`codegen.generate`)
→ optim (`optim.compile`), plus annotations (JSON), export (ONNX, GraphML, DOT) and the CLI.
"""
from .analyze import analyze
from .annotations import load
from .export import export_onnx, read_onnx_annotations
from .normgraph import Atom, Diagnostics, NormGraph
from .optim import NormGraphOptimizer, compile
from .rules import register_atom_rule, register_bond_rule, register_kind, register_module_rule
from .scale import register_scale_rule

__all__ = [
    "analyze", "compile", "load", "export_onnx", "read_onnx_annotations",
    "Atom", "Diagnostics", "NormGraph", "NormGraphOptimizer",
    "register_atom_rule", "register_bond_rule", "register_kind", "register_module_rule",
    "register_scale_rule",
]
__version__ = "0.1.0"
