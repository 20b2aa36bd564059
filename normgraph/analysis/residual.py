"""Residual branches: which atoms make up a network's repeated body.

A residual join is a plain sum whose terms share an upstream activation: `x + f(x)`, or
`g(x) + f(x)` (a ResNet block with a projection shortcut). `x + x` (one activation
doubled) is no join. The nodes strictly between that
shared activation and the join are its *branch*; an atom used inside some branch is part
of the body. Embeddings (upstream of every join, `tok + pos` shares nothing) and the
output head (downstream of the last join) are not, also when a branch reads another stream
(an encoder-decoder's cross-attention reads the encoder, whose embedding stays an embedding).

Why it matters: with one unit of mass per atom, the embedding's and the head's shares of
the update shrink like 1/depth while the body's grows, and the best learning rate drifts
with depth (measured in docs/concepts.md). Giving the body a fixed total mass (modula's
`blocks_mass`) keeps every share depth-independent. Knowing which branch each node feeds
(`Residuals.branch`, from `residuals`) lets the analysis give every branch of the body the same downstream
(rule 7, docs/concepts.md §5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from . import ops


@dataclass(frozen=True)
class Residuals:
    """One walk's findings. `branch`: each node inside a residual branch → the branch's
    output, the term of the first join after it that the node feeds (`f(x)` in `x + f(x)`).
    `between`: nodes on the stream between two joins (a post-norm LayerNorm), in no branch."""
    branch: dict[fx.Node, fx.Node]
    between: frozenset[fx.Node]

    @property
    def body(self) -> set[fx.Node]:
        """Every node inside some branch or between two joins."""
        return set(self.branch) | self.between


def residuals(graph: fx.Graph, live: set[fx.Node], is_join: Callable[[fx.Node], bool],
              signal: Callable[[fx.Node], bool]) -> Residuals:
    """One pass over `graph` in order. `is_join(node)` says which sums count as residual
    joins (the caller's sum rule); `signal(node)` which live nodes are activations (not
    weights, not integer indices).

    Each node's ancestry (the activations it depends on) is a bitset, a Python int with bit
    k for the k-th activation: unions and intersections are word operations, so the pass
    stays fast on deep models (with sets of nodes it was quadratic in the depth, 2.6 s for a
    96-layer Llama)."""
    carried: list[fx.Node] = []  # bit k of an ancestry ↔ carried[k]
    bit: dict[fx.Node, int] = {}
    ancestors: dict[fx.Node, int] = {}  # the activations each node depends on, as bits
    after_join: set[fx.Node] = set()  # nodes downstream of some join
    before_join = 0  # activations upstream of some join, as bits
    branch: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        inputs = [i for i in node.all_input_nodes if i in ancestors]
        reach = 0
        for i in inputs:
            reach |= ancestors[i] | bit.get(i, 0)
        ancestors[node] = reach
        if node in live and signal(node):
            bit[node] = 1 << len(carried)
            carried.append(node)
        if any(i in after_join for i in inputs):
            after_join.add(node)
        if node not in bit or not is_join(node):
            continue
        terms = list(dict.fromkeys(i for _, i in ops.tensor_inputs(node) if i in bit))
        if len(terms) < 2:
            continue  # `x + x`: one activation doubled, no branch
        reaches = [ancestors[t] | bit[t] for t in terms]
        shared = reaches[0]
        for r in reaches[1:]:
            shared &= r
        if not shared:
            continue  # `tok + pos`: independent inputs, not a residual join
        for term, r in zip(terms, reaches):
            # the branch; the first join after a node is its own. A side input that neither
            # depends on the shared activation nor comes out of some join (an encoder's
            # embedding, read by a decoder's cross-attention through the encoder) is no part
            # of the branch: it is another stream's input.
            for n in _nodes(r & ~shared, carried):
                if ancestors[n] & shared or n in after_join:
                    branch.setdefault(n, term)
        before_join |= ancestors[node]
        after_join.add(node)
    # between two joins: a post-norm LayerNorm after `x + f(x)` belongs to the body too
    before = set(_nodes(before_join, carried))
    return Residuals(branch, frozenset((after_join & before) - set(branch)))


def _nodes(bits: int, carried: list[fx.Node]) -> list[fx.Node]:
    """The nodes whose bits are set, in graph order."""
    out = []
    while bits:
        low = bits & -bits
        out.append(carried[low.bit_length() - 1])
        bits ^= low
    return out
