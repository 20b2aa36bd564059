"""Duality maps, eagerly: turn one atom's gradient into its unit-norm steepest direction.

The reference the generated code is tested against, and what anyone can call for one
atom's update without compiling anything. The orthogonalizing path calls the same
registered orthogonalizer, with the same settings, as the generated code. Every map sends
a zero gradient to a zero update and never produces NaN from a finite input.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..core.graph import Atom
from ..core.kinds import DUALS
from ..core.layout import as_matrices, atom_parts, from_matrices, view_problem
from .options import MapOptions, options_from
from .orthogonalizers import lookup, on_wide_batches, unit_max


def orthogonalize(x: torch.Tensor, options: MapOptions | None = None, **changes: Any) -> torch.Tensor:
    """Orthogonalize each matrix of a (..., rows, cols) batch with the registered orthogonalizer
    `options.orthogonalizer`, exactly as the generated code does for that shape."""
    options = options_from(options, changes)
    entry = lookup(options.orthogonalizer)
    m, n = sorted(x.shape[-2:])
    work = entry.work_dtype(x.device.type, options.dtype, x.dtype)
    settings = entry.settings_for(options, m, n, work, x.device.type)
    return on_wide_batches(x, lambda y: entry.fn(y, **settings), work)


def matrix_scale(atom: Atom) -> float:
    """budget · sqrt(fan_out/fan_in) / norm_scale: turns a U Vᵀ batch into a norm-`budget` update."""
    _, rows, cols = atom.options["matrix"]
    return atom.budget * math.sqrt(rows / cols) / atom.options.get("norm_scale", 1.0)


def check_atom(atom: Atom) -> None:
    """Raise a clear error if the atom cannot be dualised as it stands."""
    if atom.dual not in DUALS:
        raise ValueError(f"parameter {atom.name!r}: unknown duality map {atom.dual!r} (kind "
                         f"{atom.kind!r}); use one of {DUALS}, e.g. via "
                         f"normgraph.register_kind({atom.kind!r}, dual=..., norm=..., mass=...)")
    if atom.dual == "orthogonalize":
        views = [sub.options for _, sub in atom_parts(atom)]
        if not all("matrix" in v for v in views):
            raise ValueError(f"parameter {atom.name!r}: kind {atom.kind!r} is orthogonalized but its "
                             "atom has no matrix view; build options with layout.matrix_options(...)")
        problem = view_problem(atom)
        if problem:
            raise ValueError(f"parameter {atom.name!r}: {problem}; re-run normgraph.analyze")


def row_normalize(g: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Each row (one embedding vector) scaled to RMS 1; all-zero rows stay 0. Computed in
    float32 or wider after scaling each row by its largest entry, so any finite gradient in
    any dtype gives rows of RMS exactly 1 (no overflow to a zero update)."""
    rows = unit_max(g.reshape(g.shape[0], math.prod(g.shape[1:])), dim=1)  # (0, d) too: an empty shard
    wide = rows.to(torch.promote_types(rows.dtype, torch.float32))
    rms = wide.pow(2).mean(dim=1, keepdim=True).sqrt()
    safe = torch.where(rms > eps, rms, torch.ones_like(rms))
    return (wide / safe).to(g.dtype).reshape(g.shape)


def rms_normalize(g: torch.Tensor) -> torch.Tensor:
    """Whole tensor scaled to RMS 1; a zero tensor stays 0 (overflow-safe as `row_normalize`)."""
    wide = unit_max(g).to(torch.promote_types(g.dtype, torch.float32))
    rms = wide.pow(2).mean().sqrt()
    return (wide / torch.where(rms > 0, rms, torch.ones_like(rms))).to(g.dtype)


#: The elementwise duals: name → (function, what it does). The generated code calls these
#: same functions; "orthogonalize" goes through the orthogonalizer registry instead.
ELEMENTWISE: dict[str, tuple[Any, str]] = {
    "sign": (torch.sign, "ℓ∞ steepest direction"),
    "rms_normalize": (rms_normalize, "whole tensor scaled to RMS 1"),
    "row_normalize": (row_normalize, "each row scaled to RMS 1, zero rows stay 0"),
}


def dualize_atom(atom: Atom, grad: torch.Tensor, options: MapOptions | None = None, **changes: Any) -> torch.Tensor:
    """The update for one atom: dual(grad) × budget, of norm `budget` in the atom's norm.

    Same options as the compiled map (default `MapOptions()`: Newton–Schulz); pass
    ``orthogonalizer="svd"`` for the exact update.
    """
    options = options_from(options, changes)
    check_atom(atom)
    if tuple(grad.shape) != atom.shape:
        raise ValueError(f"parameter {atom.name!r}: gradient shape {tuple(grad.shape)} does not match "
                         f"the atom's {atom.shape}; re-run analyze on this model")
    if atom.dual == "orthogonalize" and atom.options.get("parts"):
        pieces = [dualize_atom(sub, grad.narrow(*where), options) for where, sub in atom_parts(atom)]
        return torch.cat(pieces, dim=atom.options["parts"][0]["dim"])
    if atom.dual == "orthogonalize":
        o = orthogonalize(as_matrices(grad, atom.options), options)
        return from_matrices(o * matrix_scale(atom), atom.options, atom.shape)
    fn, _ = ELEMENTWISE[atom.dual]
    return fn(grad) * atom.budget
