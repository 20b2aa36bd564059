"""The duality map's options: one frozen object, named the same in every API.

`normgraph.compile`, `NormGraphOptimizer`, `codegen.generate`, `codegen.dual.dualize_atom`
and the state dict all use these field names. The optimizer keeps `to_dict()` in its
param-group defaults, so a saved state dict says which map produced it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .orthogonalizers import DEFAULT_SCHEDULE, check_ns_method, lookup, ns_schedule
from .runtime import COMPILE_MODES


def dtype_name(dtype: torch.dtype | str | None) -> str | None:
    """"bfloat16" for torch.bfloat16 or "torch.bfloat16"; None stays None."""
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"compute_dtype {dtype!r} is not a torch dtype")
    return name


@dataclass(frozen=True)
class MapOptions:
    """How the duality map orthogonalizes and runs.

    orthogonalizer   a registered name ("newton-schulz", "svd", or your own)
    ns_steps         Newton–Schulz steps
    ns_coefficients  "polar-express" (default), "quintic" (Muon's), or (a, b, c) triples
    compute_dtype    the orthogonalizer's compute dtype (None: `orthogonalizers.compute_dtype`, bf16 on CUDA and native-bf16 CPUs)
    ns_method        "auto", "direct" or "gram" (how Newton–Schulz is evaluated)
    compile_mode     torch.compile mode for the generated map, or "eager"
    backend          torch.compile backend (None: never compile)
    max_batch_bytes  the most bytes (in the gradients' dtype) of same-shaped gradients stacked
                     into one batched call: "auto" (1/16 of all the map's gradients, within
                     64 MiB … 1 GiB: `codegen.emit.batch_cap`), a number of bytes, or None (one batch per
                     shape). The map's transient memory is a few times this (docs/performance.md)
    """

    orthogonalizer: str = "newton-schulz"
    ns_steps: int = 5
    ns_coefficients: str | tuple[tuple[float, float, float], ...] = DEFAULT_SCHEDULE
    compute_dtype: str | None = None
    ns_method: str = "auto"
    compile_mode: str = "default"
    backend: str | None = "inductor"
    max_batch_bytes: int | str | None = "auto"

    def __post_init__(self) -> None:
        coeffs = self.ns_coefficients
        if not isinstance(coeffs, str):  # hashable and JSON-like: a tuple of float triples
            object.__setattr__(self, "ns_coefficients", tuple(tuple(float(v) for v in abc) for abc in coeffs))
        object.__setattr__(self, "compute_dtype", dtype_name(self.compute_dtype))
        lookup(self.orthogonalizer)
        ns_schedule(self.ns_coefficients, self.ns_steps)
        check_ns_method(self.ns_method)
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile_mode {self.compile_mode!r}; use one of {COMPILE_MODES}")
        cap = self.max_batch_bytes
        if not (cap is None or cap == "auto" or (isinstance(cap, int) and not isinstance(cap, bool) and cap > 0)):
            raise ValueError(f"max_batch_bytes={cap!r}: expected 'auto', None (no cap) or a positive "
                             "number of bytes")

    @property
    def dtype(self) -> torch.dtype | None:
        """`compute_dtype` as a torch dtype (None: the device default)."""
        return getattr(torch, self.compute_dtype) if self.compute_dtype else None

    def replace(self, **changes: Any) -> "MapOptions":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (str, int, None, lists), so `torch.load(weights_only=True)` reads it."""
        d = dataclasses.asdict(self)
        if not isinstance(self.ns_coefficients, str):
            d["ns_coefficients"] = [list(abc) for abc in self.ns_coefficients]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MapOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown map option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def options_from(options: MapOptions | None, changes: dict[str, Any]) -> MapOptions:
    """`options` (default MapOptions()) with keyword `changes` applied; unknown names refused."""
    base = options if options is not None else MapOptions()
    known = {f.name for f in dataclasses.fields(MapOptions)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"unknown map option(s) {unknown}; the options are {sorted(known)}")
    return base.replace(**changes) if changes else base


__all__ = ["MapOptions", "COMPILE_MODES", "options_from", "dtype_name"]
