"""Atom kinds: everything normgraph knows about a kind, in one registry.

A kind names how a parameter is measured and moved: the duality map that turns its
gradient into a unit step (`dual`), a label for its operator norm (`norm`, shown in tables
and saved in annotations), its default share of the update (`mass`, docs/norms.md says
why each), and optionally an exact norm function (`norm_fn(atom, tensor) -> float`; by
default the norm that `dual` is the duality map of, see `core.layout.atom_norm`).
`register_kind` is the only writer.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .registry import Registry

#: The duality maps a kind can use. The code generator implements each of them; they are
#: named here, at the bottom of the package, so that declaring a kind needs no codegen.
DUALS = ("orthogonalize", "row_normalize", "sign", "rms_normalize")


@dataclass(frozen=True)
class Kind:
    """One atom kind (see the module docstring)."""

    name: str
    dual: str
    norm: str
    mass: float
    norm_fn: Callable[[Any, Any], float] | None = None


def _check(name: str, kind: Kind) -> None:
    if kind.dual not in DUALS:
        raise ValueError(f"register_kind({name!r}): unknown duality map {kind.dual!r}; use one of {DUALS}")
    if not (isinstance(kind.mass, (int, float)) and math.isfinite(kind.mass) and kind.mass >= 0):
        raise ValueError(f"register_kind({name!r}): mass must be a finite number >= 0, got {kind.mass}")


KINDS: Registry[str, Kind] = Registry("atom kind", check=_check)


def register_kind(kind: str, *, dual: str, norm: str, mass: float,
                  norm_fn: Callable[[Any, Any], float] | None = None) -> Kind:
    """A new atom kind (or a replacement for a built-in one).

    An atom rule may return any kind; an unregistered one is treated as `fallback` (RMS
    norm, `rms_normalize`, mass 0.1). An "orthogonalize" kind also needs a matrix view in
    its atoms' options (`analysis.rules.matrix_spec` or `core.layout.matrix_options`).
    """
    return KINDS.register(kind, Kind(kind, dual, norm, float(mass), norm_fn))


register_kind("linear", dual="orthogonalize", norm="RMS→RMS", mass=1.0)
register_kind("conv", dual="orthogonalize", norm="K·max_k RMS→RMS", mass=1.0)
register_kind("expert", dual="orthogonalize", norm="max_e RMS→RMS", mass=1.0)
register_kind("embedding", dual="row_normalize", norm="ℓ1→RMS", mass=1.0)
register_kind("channel_conv", dual="row_normalize", norm="max_c RMS (per output channel)", mass=1.0)
register_kind("stem", dual="sign", norm="ℓ∞ (entries)", mass=0.1)
register_kind("gain", dual="sign", norm="ℓ∞ (RMS→RMS of diag)", mass=0.1)
register_kind("bias", dual="rms_normalize", norm="RMS", mass=0.1)
register_kind("fallback", dual="rms_normalize", norm="RMS", mass=0.1)


def kind_of(name: str) -> Kind:
    """The registered kind, or the fallback's facts under this name for an unregistered one."""
    kind = KINDS.get(name)
    if kind is None:
        fallback = KINDS["fallback"]
        return Kind(name, fallback.dual, fallback.norm, fallback.mass)
    return kind


def is_orthogonalized(kind: str) -> bool:
    """Whether atoms of this kind are dualised by orthogonalizing matrix views."""
    return kind_of(kind).dual == "orthogonalize"
