"""A duality map whose orthogonalizations are split over the ranks of a process group.

Under data parallelism (DDP) every rank holds the same, already averaged gradients, so
running the whole map on every rank repeats the expensive part (Newton–Schulz) world-size
times. `ShardedMap` gives each orthogonalized atom one owner rank, balancing the owners'
matmul FLOPs (longest-processing-time first), runs on each rank a generated map over its
own atoms (same-shape atoms of one owner are still stacked into one batched call), and
exchanges the results with one all-gather per dtype. Elementwise duals are
cheap and run on every rank. Every rank ends with the same bytes: each update is computed
once, by its owner, and copied to the others.

Bytes exchanged per step: for each rank, (max over ranks of its owned entries) × world ×
the element size, i.e. about the orthogonalized parameters' size once, plus padding.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .. import codegen
from ..codegen.options import MapOptions
from ..core.graph import Atom


def balance(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item, greedily giving the next-costliest item to the least-loaded
    rank (LPT: within 4/3 of the best split). Ties go to the lower rank: deterministic, so
    every rank computes the same assignment without communicating."""
    owners = [0] * len(costs)
    heap = [(0.0, r) for r in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (load + costs[i], rank))
    return owners


def _all_gather(out: torch.Tensor, mine: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """Every rank's `mine`, concatenated in rank order, into `out` (newer torch names it
    `all_gather_single`; `all_gather_into_tensor` is the same collective)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


def assign_owners(atoms: Sequence[Atom], specs: Sequence[codegen.Spec], options: MapOptions, world: int,
                  which: Sequence[int]) -> tuple[list[list[int]], list[float]]:
    """(the atoms each rank owns, each rank's matmul FLOPs) for the atoms `which`, balanced by
    the FLOPs `codegen.flops` counts (elementwise atoms cost 0)."""
    costs = [codegen.flops([atoms[i]], options, [specs[i]]) if atoms[i].dual == "orthogonalize" else 0.0
             for i in which]
    owner = dict(zip(which, balance(costs, world)))
    owned = [[i for i in which if owner[i] == r] for r in range(world)]
    loads = [sum(c for i, c in zip(which, costs) if owner[i] == r) for r in range(world)]
    return owned, loads


class OwnedMap:
    """The part a rank runs of a map split over ranks: the generated map over its atoms."""

    map: codegen.DualityMap

    @property
    def compiled(self) -> bool:  # not a snapshot: the map may fall back to eager later
        return self.map.compiled


class ShardedMap(OwnedMap):
    """Callable like a `DualityMap` (list of gradients in, list of updates out)."""

    def __init__(self, atoms: Sequence[Atom], specs: Sequence[codegen.Spec], options: MapOptions,
                 group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.atoms = list(atoms)
        ortho = [i for i, a in enumerate(self.atoms) if a.dual == "orthogonalize"]
        self.owned, self.loads = assign_owners(self.atoms, specs, options, self.world, ortho)
        others = {i for r, items in enumerate(self.owned) if r != self.rank for i in items}
        self.local = [i for i in range(len(self.atoms)) if i not in others]  # mine + every elementwise atom
        self.source, self.map = codegen.generate([self.atoms[i] for i in self.local], options,
                                                 specs=[specs[i] for i in self.local])

    def __call__(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(self.atoms)
        for i, u in zip(self.local, self.map([grads[i] for i in self.local])):
            out[i] = u
        if self.world > 1:
            self._exchange(out, grads)
        return out  # type: ignore[return-value]

    def _exchange(self, out: list[torch.Tensor | None], grads: list[torch.Tensor]) -> None:
        """Copy every owner's updates to all ranks: one padded all-gather per (dtype, device)."""
        buckets: dict[tuple[torch.dtype, torch.device], list[list[int]]] = {}
        for r, items in enumerate(self.owned):
            for i in items:
                key = (grads[i].dtype, grads[i].device)
                buckets.setdefault(key, [[] for _ in range(self.world)])[r].append(i)
        for (dtype, device), per_rank in buckets.items():
            sizes = [sum(grads[i].numel() for i in items) for items in per_rank]
            width = max(sizes)
            mine = per_rank[self.rank]
            send = torch.zeros(width, dtype=dtype, device=device)
            if mine:
                send[:sizes[self.rank]] = torch.cat([out[i].reshape(-1) for i in mine])  # type: ignore[union-attr]
            recv = torch.empty(width * self.world, dtype=dtype, device=device)
            _all_gather(recv, send, self.group)
            for r, items in enumerate(per_rank):
                if r == self.rank:
                    continue
                start = r * width
                for i in items:
                    n = grads[i].numel()
                    out[i] = recv[start:start + n].view(grads[i].shape)
                    start += n
