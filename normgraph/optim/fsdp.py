"""The duality map for FSDP2 (`fully_shard`): every rank holds row shards (dim 0) of each
parameter and its gradient, as DTensors on a 1-D device mesh.

* An orthogonalized matrix needs its whole gradient, but on one rank only: each matrix gets
  an owner (FLOP-balanced, as in `sharded.balance`); one `all_to_all_single` per dtype sends
  every rank's row shards of the matrices to their owners, the owner runs a generated map
  over its full matrices (same-shape ones stacked), and a second `all_to_all_single` sends
  each rank its rows of the updates. No parameter is ever gathered on every rank.
* `sign` and `row_normalize` run on the local shards (rows are never split by a dim-0
  shard). `rms_normalize` needs the whole tensor's RMS: those tensors (biases, fallbacks:
  small) travel to an owner with the matrices, in the same two collectives, so every update
  is computed by the same code on the same numbers as in one process (an all-reduced sum of
  squares would differ in its last bits, which the exact SVD orthogonalizer amplifies on
  ill-conditioned gradients).

Bytes per step, per rank: about 2 × (its shards of the orthogonalized and rms-normalised
gradients) sent and received (docs/distributed.md).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .. import codegen
from ..codegen.dual import ELEMENTWISE
from ..codegen.options import MapOptions
from ..core.graph import Atom
from .sharded import OwnedMap, assign_owners


def local_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """(start, size) of `rank`'s rows of a dim of size n sharded as FSDP2 does (torch.chunk:
    chunks of ceil(n / world) rows, the last ones short or empty)."""
    chunk = -(-n // world) if n else 0
    start = min(rank * chunk, n)
    return start, max(0, min(chunk, n - start))


def mesh_group(params: Sequence[torch.Tensor]) -> dist.ProcessGroup:
    """The process group of the DTensor parameters' 1-D mesh; a clear error for anything else."""
    from torch.distributed.tensor import DTensor, Shard
    plain = [i for i, p in enumerate(params) if not isinstance(p, DTensor)]
    if plain and len(plain) < len(params):
        raise ValueError("some parameters are DTensors and some are not: apply fully_shard to the root module "
                         "too (fully_shard(model) after the blocks), so every parameter is sharded")
    meshes = {p.device_mesh for p in params}
    if len(meshes) != 1:
        raise ValueError("the parameters live on more than one device mesh; normgraph shards its map over one")
    mesh = next(iter(meshes))
    bad = [p.placements for p in params if tuple(p.placements) != (Shard(0),)]
    if mesh.ndim != 1 or bad:
        raise ValueError(f"normgraph supports FSDP2 on a 1-D mesh with Shard(0) placements (got a {mesh.ndim}-D mesh, "
                         f"placements {bad[:1] or params[0].placements}); for HSDP pass the shard sub-mesh")
    return mesh.get_group()


class RowShardedMap(OwnedMap):
    """Callable on the *local* gradient shards (list in, local update shards out)."""

    def __init__(self, atoms: Sequence[Atom], specs: Sequence[codegen.Spec], options: MapOptions,
                 group: dist.ProcessGroup) -> None:
        self.group, self.world, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.atoms = list(atoms)
        # matrices need all their rows; so does a whole-tensor RMS (cheap: biases, gains' kin)
        whole = [i for i, a in enumerate(self.atoms) if a.dual in ("orthogonalize", "rms_normalize")]
        self.owned, self.loads = assign_owners(self.atoms, specs, options, self.world, whole)
        mine = self.owned[self.rank]
        self.source, self.map = codegen.generate([self.atoms[i] for i in mine], options,
                                                 specs=[specs[i] for i in mine])

    def _rows(self, i: int, rank: int) -> tuple[int, int]:
        return local_rows(self.atoms[i].shape[0], self.world, rank)

    def _row_numel(self, i: int) -> int:
        return math.prod(self.atoms[i].shape[1:])

    def __call__(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        for i, g in enumerate(grads):
            want = self._rows(i, self.rank)[1]
            if g.shape[0] != want:
                raise RuntimeError(f"{self.atoms[i].name}: local shard has {g.shape[0]} rows, expected {want} "
                                   "(FSDP2's Shard(0) chunking)")
        out: list[torch.Tensor | None] = [None] * len(self.atoms)
        self._elementwise(grads, out)
        self._via_owners(grads, out)
        return out  # type: ignore[return-value]

    # -- elementwise, on the local rows ---------------------------------------------------

    def _elementwise(self, grads: list[torch.Tensor], out: list[torch.Tensor | None]) -> None:
        for i, a in enumerate(self.atoms):
            if a.dual in ("sign", "row_normalize"):
                fn, _ = ELEMENTWISE[a.dual]
                out[i] = fn(grads[i]) * a.budget

    # -- orthogonalized and RMS-normalised, on their owners ------------------------------

    def _via_owners(self, grads: list[torch.Tensor], out: list[torch.Tensor | None]) -> None:
        buckets: dict[torch.dtype, list[list[int]]] = {}
        for r, items in enumerate(self.owned):
            for i in items:
                buckets.setdefault(grads[i].dtype, [[] for _ in range(self.world)])[r].append(i)
        full: dict[int, torch.Tensor] = {}
        device = grads[0].device if grads else torch.device("cpu")
        for dtype, per_owner in buckets.items():
            # 1. my rows of every matrix, to its owner
            send = [torch.cat([grads[i].reshape(-1) for i in items]) if items else
                    torch.empty(0, dtype=dtype, device=device) for items in per_owner]
            in_splits = [t.numel() for t in send]
            mine = per_owner[self.rank]
            out_splits = [sum(self._rows(i, r)[1] * self._row_numel(i) for i in mine) for r in range(self.world)]
            recv = torch.empty(sum(out_splits), dtype=dtype, device=device)
            dist.all_to_all_single(recv, torch.cat(send), out_splits, in_splits, group=self.group)
            # reassemble my matrices: rank r's rows of each, in rank order
            pieces: dict[int, list[torch.Tensor]] = {i: [] for i in mine}
            offset = 0
            for r in range(self.world):
                for i in mine:
                    n = self._rows(i, r)[1] * self._row_numel(i)
                    pieces[i].append(recv[offset:offset + n].view(self._rows(i, r)[1], *self.atoms[i].shape[1:]))
                    offset += n
            for i in mine:
                full[i] = torch.cat(pieces[i])
        updates = dict(zip(self.owned[self.rank], self.map([full[i] for i in self.owned[self.rank]])))
        for dtype, per_owner in buckets.items():
            # 2. each rank's rows of my updates, back to it
            mine = per_owner[self.rank]
            send_parts, in_splits = [], []
            for r in range(self.world):
                rows = [updates[i].narrow(0, *self._rows(i, r)).reshape(-1) for i in mine]
                part = torch.cat(rows) if rows else torch.empty(0, dtype=dtype, device=device)
                send_parts.append(part)
                in_splits.append(part.numel())
            out_splits = [sum(grads[i].numel() for i in per_owner[r]) for r in range(self.world)]
            recv = torch.empty(sum(out_splits), dtype=dtype, device=device)
            dist.all_to_all_single(recv, torch.cat(send_parts), out_splits, in_splits, group=self.group)
            offset = 0
            for r in range(self.world):
                for i in per_owner[r]:
                    n = grads[i].numel()
                    out[i] = recv[offset:offset + n].view(grads[i].shape)
                    offset += n
