"""normgraph: compile a torch model's modular norm into a duality map and an optimizer.

The package reads as the pipeline, one subpackage per pass over the data in `core`:

    analysis (trace → ops/rules/scale → analyze)  →  NormGraph (core)
    codegen  (plan → emit → runtime; orthogonalizers)  →  duality map
    optim    (functional step, NormGraphOptimizer)
    io       (JSON annotations, ONNX, graph formats)

`api` wires passes together (`compile`, `export_onnx`); `cli`, `hf` (weightless transformers
models from a config) and `demo` sit on top.
"""
from .analysis import analyze, register_atom_rule, register_bond_rule, register_module_rule, register_op
from .analysis import AnalysisOptions, register_scale_rule
from .api import compile, export_onnx, load
from .codegen import MapOptions, register_orthogonalizer
from .core import Atom, Diagnostics, NormGraph, register_kind
from .io import read_onnx_annotations
from .optim import NormGraphOptimizer
from . import hf  # transformers models from a config, without weights (imports transformers lazily)

__all__ = [
    "analyze", "compile", "load", "export_onnx", "read_onnx_annotations",
    "AnalysisOptions", "Atom", "Diagnostics", "NormGraph", "NormGraphOptimizer", "MapOptions",
    "register_atom_rule", "register_bond_rule", "register_kind", "register_module_rule",
    "register_scale_rule", "register_op", "register_orthogonalizer",
]
__version__ = "0.1.0"
