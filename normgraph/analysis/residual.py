"""Residual branches: which atoms make up a network's repeated body.

A residual join is a plain sum whose terms share an upstream activation: `x + f(x)`, or
`g(x) + f(x)` (a ResNet block with a projection shortcut). `x + x` (one activation
doubled) is no join. The nodes strictly between that
shared activation and the join are its *branch*; an atom used inside some branch is part
of the body. Embeddings (upstream of every join, `tok + pos` shares nothing) and the
output head (downstream of the last join) are not.

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
    weights, not integer indices)."""
    def carries(n: fx.Node) -> bool:
        return n in live and signal(n)

    ancestors: dict[fx.Node, frozenset[fx.Node]] = {}  # the activations each node depends on
    after_join: set[fx.Node] = set()  # nodes downstream of some join
    before_join: set[fx.Node] = set()  # activations upstream of some join
    branch: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        inputs = [i for i in node.all_input_nodes if i in ancestors]
        reach_of = [ancestors[i] | {i} if carries(i) else ancestors[i] for i in inputs]
        ancestors[node] = frozenset().union(*reach_of) if reach_of else frozenset()
        if any(i in after_join for i in inputs):
            after_join.add(node)
        if not carries(node) or not is_join(node):
            continue
        terms = list(dict.fromkeys(i for _, i in ops.tensor_inputs(node) if carries(i)))
        if len(terms) < 2:
            continue  # `x + x`: one activation doubled, no branch
        reach = [ancestors[t] | {t} for t in terms]
        shared = frozenset.intersection(*reach)
        if not shared:
            continue  # `tok + pos`: independent inputs, not a residual join
        for term, r in zip(terms, reach):
            for n in r - shared:  # the branch; the first join after a node is its own
                branch.setdefault(n, term)
        before_join |= ancestors[node]
        after_join.add(node)
    # between two joins: a post-norm LayerNorm after `x + f(x)` belongs to the body too
    return Residuals(branch, frozenset((after_join & before_join) - set(branch)))
