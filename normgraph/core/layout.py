"""Matrix views of parameters and the exact (SVD) norm of each atom kind.

The duality maps and the tests both need to see a conv kernel or an expert stack as a
batch of (fan_out × fan_in) matrices; this module is the single place that knows how.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .graph import Atom
from .kinds import kind_of


def matrix_options(pre_shape: list[int], perm: list[int], batch: int, fan_out: int, fan_in: int,
                   norm_scale: float = 1.0) -> dict[str, Any]:
    """Options that let `as_matrices` turn the tensor into `batch` (fan_out × fan_in) matrices."""
    return {"pre_shape": [int(s) for s in pre_shape], "perm": [int(p) for p in perm],
            "matrix": [int(batch), int(fan_out), int(fan_in)], "norm_scale": float(norm_scale)}


#: One step of a view program: ("reshape", shape) or ("permute", dims).
ViewOp = tuple[str, tuple[int, ...]]


def _identity(perm: list[int]) -> bool:
    return list(perm) == list(range(len(perm)))


def matrix_view(options: dict[str, Any], shape: tuple[int, ...], two_d: bool = False) -> list[ViewOp]:
    """The view program from a tensor of `shape` to its (B, fan_out, fan_in) matrices, or to
    (fan_out, fan_in) when `two_d` (B = 1, no permutation). Steps that change nothing are
    left out. `as_matrices` runs it; the code generator writes it out as text."""
    b, r, c = options["matrix"]
    if _identity(options["perm"]):
        target = (r, c) if two_d else (b, r, c)
        return [] if tuple(shape) == target else [("reshape", target)]
    pre = tuple(options["pre_shape"])
    return ([] if tuple(shape) == pre else [("reshape", pre)]) + [("permute", tuple(options["perm"])),
                                                                  ("reshape", (b, r, c))]


def parameter_view(options: dict[str, Any], shape: tuple[int, ...], two_d: bool = False) -> list[ViewOp]:
    """The inverse program of `matrix_view`: from the matrices back to a tensor of `shape`."""
    b, r, c = options["matrix"]
    if _identity(options["perm"]):
        source = (r, c) if two_d else (b, r, c)
        return [] if tuple(shape) == source else [("reshape", tuple(shape))]
    perm = list(options["perm"])
    inv = tuple(perm.index(i) for i in range(len(perm)))
    permuted = tuple(options["pre_shape"][p] for p in perm)
    return [("reshape", permuted), ("permute", inv), ("reshape", tuple(shape))]


def run_view(t: torch.Tensor, program: list[ViewOp]) -> torch.Tensor:
    for op, dims in program:
        t = t.reshape(dims) if op == "reshape" else t.permute(dims)
    return t


def as_matrices(t: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
    """(B, fan_out, fan_in) view of a matrix-like parameter (or its gradient)."""
    return run_view(t, matrix_view(options, tuple(t.shape)))


def from_matrices(m: torch.Tensor, options: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `as_matrices`."""
    return run_view(m, parameter_view(options, tuple(shape)))


def part_options(parts: list[tuple[int, int, dict[str, Any]]], dim: int) -> dict[str, Any]:
    """Options of a matrix parameter split along `dim` into independently orthogonalized parts
    of unequal sizes (a fused q/k/v projection with fewer k/v heads: 64 + 16 + 16 rows).
    `parts` holds (start, size, matrix_options of that slice)."""
    return {"parts": [{"dim": int(dim), "start": int(a), "size": int(n), **o} for a, n, o in parts]}


def atom_parts(atom: Atom) -> list[tuple[tuple[int, int, int] | None, Atom]]:
    """((dim, start, size) or None, atom) for each independently dualised piece of `atom`: the
    atom itself, or one sub-atom per part (its shape the slice's, its options the part's)."""
    parts = atom.options.get("parts")
    if not parts:
        return [(None, atom)]
    out = []
    for p in parts:
        shape = list(atom.shape)
        shape[p["dim"]] = p["size"]
        opts = {k: v for k, v in p.items() if k not in ("dim", "start", "size")}
        sub = dataclasses.replace(atom, name=f"{atom.name}[{p['start']}:{p['start'] + p['size']}]",
                                  shape=tuple(shape), options=opts)
        out.append(((p["dim"], p["start"], p["size"]), sub))
    return out


def view_problem(atom: Atom) -> str | None:
    """Why `atom`'s matrix view(s) cannot be applied to a tensor of its shape, or None.

    Checked where annotations enter (load, codegen), so a hand-edited view fails there with
    the parameter's name instead of inside the generated code at the first step."""
    parts = atom.options.get("parts")
    if parts is not None:
        if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
            return "options.parts must be a non-empty list of objects"
        dims = {p.get("dim") for p in parts}
        if len(dims) != 1 or not isinstance(next(iter(dims)), int) or not 0 <= next(iter(dims)) < len(atom.shape):
            return f"options.parts must all split one dim of the shape {atom.shape}"
        dim, start = next(iter(dims)), 0
        for p in parts:
            if p.get("start") != start or not isinstance(p.get("size"), int) or p["size"] <= 0:
                return f"options.parts must tile dim {dim} from 0 without gaps (part at {p.get('start')})"
            start += p["size"]
        if start != atom.shape[dim]:
            return f"options.parts cover {start} of the {atom.shape[dim]} entries of dim {dim}"
    for _, sub in atom_parts(atom):
        o, n = sub.options, math.prod(sub.shape)
        pre, perm, mat = o.get("pre_shape"), o.get("perm"), o.get("matrix")
        if not all(isinstance(v, list) and all(isinstance(x, int) and x >= 0 for x in v) for v in (pre, perm, mat)):
            return f"{sub.name}: options need integer lists pre_shape, perm and matrix"
        if len(mat) != 3 or math.prod(mat) != n or math.prod(pre) != n:
            return f"{sub.name}: matrix view {mat} / pre_shape {pre} do not hold the {n} entries of shape {sub.shape}"
        if sorted(perm) != list(range(len(pre))):
            return f"{sub.name}: perm {perm} is not a permutation of the {len(pre)} dims of pre_shape"
    return None


def atom_norm(atom: Atom, t: torch.Tensor) -> float:
    """Exact operator norm of `t` in `atom`'s norm (SVD reference, for tests and users): the
    kind's own `norm_fn` if it registered one, else the norm whose duality map `atom.dual` is."""
    own = kind_of(atom.kind).norm_fn
    if own is not None:
        return float(own(atom, t))
    if atom.options.get("parts"):  # the norm of a split atom: the largest of its parts'
        return max(atom_norm(sub, t.narrow(*where)) for where, sub in atom_parts(atom))
    t = t.detach().double()
    if atom.dual == "orthogonalize" or atom.options.get("matrix"):
        m = as_matrices(t, atom.options)
        _, rows, cols = m.shape
        sigma = torch.linalg.matrix_norm(m, ord=2).max().item()
        return atom.options.get("norm_scale", 1.0) * math.sqrt(cols / rows) * sigma
    if atom.dual == "row_normalize":  # ℓ1→RMS: the largest row RMS
        return t.reshape(t.shape[0], -1).pow(2).mean(dim=1).sqrt().max().item()
    if atom.dual == "sign":  # ℓ∞
        return t.abs().max().item()
    return t.pow(2).mean().sqrt().item()
