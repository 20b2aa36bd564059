"""Rule 7: the residual body read depth-flat (`analyze(body_profile="flat")`, the default).

Each body atom's budget is scaled by D(its branch's output) / D̄, D̄ the harmonic mean over
the body's branches, so every block of a repeated stack gets the same budgets, their sum
is what the measured profile gives, and the ratios inside a block stay as measured."""
from __future__ import annotations

import statistics

import pytest
import torch

import normgraph
from normgraph.analysis.residual import residuals

from test_analyze import ResidualMLP
from test_scale import IDS, PreNorm

ROLES = ("ln", "w1", "w2")


def _by_role(ng, L):
    return {r: [ng.atoms[f"{r}.{i}.weight"].budget for i in range(L)] for r in ROLES}


@pytest.mark.parametrize("L", [2, 4, 8])
def test_flat_body_gives_every_block_the_mean_of_the_measured_budgets(L):
    measured = normgraph.analyze(PreNorm(L), IDS, body_profile="measured")
    flat = normgraph.analyze(PreNorm(L), IDS)
    m, f = _by_role(measured, L), _by_role(flat, L)
    assert max(m["w2"]) / min(m["w2"]) > 1.2  # the measured profile does vary with depth here
    for r in ROLES:
        # every block of the same role moves alike, and the body's total is kept
        assert f[r] == pytest.approx([statistics.mean(m[r])] * L, rel=1e-9)
    for i in range(L):  # the ratios inside a block are the measured ones
        assert f["w1"][i] / f["w2"][i] == pytest.approx(m["w1"][i] / m["w2"][i])
    for name in ("emb.weight", "ln_f.weight", "head.weight"):  # outside the body: untouched
        assert flat.atoms[name].budget == pytest.approx(measured.atoms[name].budget)
        assert flat.atoms[name].budget_scale == 1.0
    # only the budget moves: the downstream column stays the measured one
    assert all(flat.atoms[n].downstream == measured.atoms[n].downstream for n in flat.atoms)
    assert any("depth-flat" in n for n in flat.diagnostics.notes)
    assert not any("depth-flat" in n for n in measured.diagnostics.notes)


def test_one_block_and_the_other_modes_are_unchanged():
    one = normgraph.analyze(PreNorm(1), IDS)
    one_measured = normgraph.analyze(PreNorm(1), IDS, body_profile="measured")
    assert {n: a.budget for n, a in one.atoms.items()} == {n: a.budget for n, a in one_measured.atoms.items()}
    modula = normgraph.analyze(PreNorm(4), IDS, sensitivity="modula")
    assert {a.budget_scale for a in modula.atoms.values()} == {1.0}
    convex = normgraph.analyze(ResidualMLP(3), (torch.randn(4, 8),))  # weighted residuals: no body
    assert {a.budget_scale for a in convex.atoms.values()} == {1.0}


def test_body_profile_is_validated_and_reaches_compile():
    with pytest.raises(ValueError, match="body_profile"):
        normgraph.analyze(PreNorm(2), IDS, body_profile="flatter")
    model = PreNorm(3)
    opt = normgraph.compile(model, IDS, body_profile="measured", compile_mode="eager")
    want = normgraph.analyze(model, IDS, body_profile="measured")
    assert opt.norm_graph.atoms["w1.0.weight"].budget == pytest.approx(want.atoms["w1.0.weight"].budget)


class PostNorm(torch.nn.Module):
    """x_{l+1} = LN_l(x_l + W2·relu(W1·x_l)): the LayerNorm sits on the stream, between joins."""

    def __init__(self, L: int = 3, d: int = 8, vocab: int = 16) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.w1 = torch.nn.ModuleList(torch.nn.Linear(d, 2 * d, bias=False) for _ in range(L))
        self.w2 = torch.nn.ModuleList(torch.nn.Linear(2 * d, d, bias=False) for _ in range(L))
        self.ln = torch.nn.ModuleList(torch.nn.LayerNorm(d, bias=False) for _ in range(L))
        self.head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for w1, w2, ln in zip(self.w1, self.w2, self.ln):
            x = ln(x + w2(torch.relu(w1(x))))
        return self.head(x)


def test_post_norm_stream_atoms_are_in_no_branch_and_keep_their_budgets():
    measured = normgraph.analyze(PostNorm(), IDS, body_profile="measured")
    flat = normgraph.analyze(PostNorm(), IDS)
    for i in range(3):  # the LayerNorms between joins: in the body (they share its mass), in no branch
        name = f"ln.{i}.weight"
        assert flat.atoms[name].budget == pytest.approx(measured.atoms[name].budget)
    for r in ("w1", "w2"):
        want = statistics.mean(measured.atoms[f"{r}.{i}.weight"].budget for i in range(3))
        for i in range(3):
            assert flat.atoms[f"{r}.{i}.weight"].budget == pytest.approx(want)


def test_branch_outputs_map_each_branch_node_to_its_own_join_term():
    gm = torch.fx.symbolic_trace(PreNorm(2))
    nodes = {n.name: n for n in gm.graph.nodes}
    live = set(gm.graph.nodes)
    out = residuals(gm.graph, live, lambda n: n.op == "call_function" and n.target.__name__ == "add",
                    lambda n: n.op != "get_attr").branch
    assert out[nodes["w1_0"]] is nodes["w2_0"] and out[nodes["relu"]] is nodes["w2_0"]
    assert out[nodes["w1_1"]] is nodes["w2_1"]
    assert nodes["emb"] not in out and nodes["head"] not in out
