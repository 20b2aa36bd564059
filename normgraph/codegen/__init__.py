"""Codegen: from a norm graph to a duality-map function specialised to the architecture.

plan (group atoms by dual/shape/dtype/device) → emit (Python source + its globals) →
runtime (`DualityMap`: torch.compile with an eager fallback). Orthogonalizers are a
registry (`register_orthogonalizer`); the eager reference of every map is `codegen.dual`.
"""
from .emit import PythonCode, cache_key, exec_code, flops, generate, generate_source
from .options import COMPILE_MODES, MapOptions
from .orthogonalizers import ORTHOGONALIZERS, Orthogonalizer, register_orthogonalizer
from .plan import Spec, spec_of
from .runtime import DualityMap

__all__ = ["generate", "generate_source", "exec_code", "PythonCode", "DualityMap", "cache_key", "flops",
           "spec_of", "Spec", "MapOptions", "COMPILE_MODES", "ORTHOGONALIZERS", "Orthogonalizer",
           "register_orthogonalizer"]
