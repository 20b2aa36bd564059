"""The data at the bottom of the pipeline: atoms, the norm graph, kinds and matrix views.

Imports nothing from the passes above it (analysis, codegen, optim, io).
"""
from .graph import WRITERS, Atom, Diagnostics, NormGraph, budget_of
from .kinds import DUALS, KINDS, Kind, is_orthogonalized, kind_of, register_kind
from .registry import Registry

__all__ = ["Atom", "Diagnostics", "NormGraph", "budget_of", "WRITERS",
           "DUALS", "KINDS", "Kind", "kind_of", "is_orthogonalized", "register_kind", "Registry"]
