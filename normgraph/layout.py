"""Matrix views of parameters and the exact (SVD) norm of each atom kind.

The duality maps and the tests both need to see a conv kernel or an expert stack as a
batch of (fan_out × fan_in) matrices; this module is the single place that knows how.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .normgraph import Atom

ORTHOGONALIZED_KINDS = ("linear", "conv", "expert")


def matrix_options(pre_shape: list[int], perm: list[int], batch: int, fan_out: int, fan_in: int,
                   norm_scale: float = 1.0) -> dict[str, Any]:
    """Options that let `as_matrices` turn the tensor into `batch` (fan_out × fan_in) matrices."""
    return {"pre_shape": [int(s) for s in pre_shape], "perm": [int(p) for p in perm],
            "matrix": [int(batch), int(fan_out), int(fan_in)], "norm_scale": float(norm_scale)}


def as_matrices(t: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
    """(B, fan_out, fan_in) view of a matrix-like parameter (or its gradient)."""
    return t.reshape(options["pre_shape"]).permute(options["perm"]).reshape(options["matrix"])


def from_matrices(m: torch.Tensor, options: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `as_matrices`."""
    perm = options["perm"]
    inv = [perm.index(i) for i in range(len(perm))]
    permuted = [options["pre_shape"][p] for p in perm]
    return m.reshape(permuted).permute(inv).reshape(shape)


def atom_norm(atom: Atom, t: torch.Tensor) -> float:
    """Exact operator norm of `t` in `atom`'s norm (SVD reference, for tests and users)."""
    t = t.detach().double()
    if atom.kind in ORTHOGONALIZED_KINDS or atom.options.get("matrix"):
        m = as_matrices(t, atom.options)
        _, rows, cols = m.shape
        sigma = torch.linalg.matrix_norm(m, ord=2).max().item()
        return atom.options.get("norm_scale", 1.0) * math.sqrt(cols / rows) * sigma
    if atom.kind == "embedding":
        return t.reshape(t.shape[0], -1).pow(2).mean(dim=1).sqrt().max().item()
    if atom.kind == "gain":
        return t.abs().max().item()
    return t.pow(2).mean().sqrt().item()
