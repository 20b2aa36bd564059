"""The plan of a duality map: which atoms are dualised together.

Atoms (or parts of split atoms) with the same dual, matrix shape, dtype and device form
one group: the generated code stacks a group's gradients and orthogonalizes them in one
batched call. Pure data over atoms; the emitter and the flop counter both read it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..core.graph import Atom, NormGraph
from ..core.layout import atom_parts
from .dual import check_atom

#: (dtype, device) of one gradient, as strings, e.g. ("float32", "cpu").
Spec = tuple[str, str]
#: (gradient index, atom or part of one, (dim, start, size) of the part or None)
Member = tuple[int, Atom, "tuple[int, int, int] | None"]


def spec_of(t: torch.Tensor) -> Spec:
    """The (dtype, device) pair that the generated code is specialised on."""
    return str(t.dtype).replace("torch.", ""), str(t.device)


@dataclass
class Group:
    """Atoms dualised together: same map, same matrix shape, same dtype and device."""

    dual: str
    rows: int
    cols: int
    dtype: str
    device: str
    members: list[Member] = field(default_factory=list)

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    @property
    def matrices(self) -> int:
        return sum(a.options["matrix"][0] for _, a, _ in self.members)


def as_atom_list(atoms: Sequence[Atom] | NormGraph | dict[str, Atom]) -> list[Atom]:
    if isinstance(atoms, NormGraph):
        return list(atoms.atoms.values())
    if isinstance(atoms, dict):
        return list(atoms.values())
    return list(atoms)


def plan(atoms: list[Atom], specs: list[Spec]) -> list[Group]:
    """Groups in first-seen order; every atom is checked (a clear error names a bad one)."""
    if len(specs) != len(atoms):
        raise ValueError(f"got {len(specs)} gradient specs for {len(atoms)} atoms")
    groups: dict[tuple, Group] = {}
    for i, (atom, (dt, dev)) in enumerate(zip(atoms, specs)):
        check_atom(atom)
        for where, piece in atom_parts(atom) if atom.dual == "orthogonalize" else [(None, atom)]:
            rows, cols = piece.options["matrix"][1:] if atom.dual == "orthogonalize" else (0, 0)
            key = (atom.dual, rows, cols, dt, dev)
            groups.setdefault(key, Group(atom.dual, rows, cols, dt, dev)).members.append((i, piece, where))
    return list(groups.values())
