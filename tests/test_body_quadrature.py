"""A plain residual body in "hybrid" mode: its budgets read in quadrature (√(n_eff / n_ref)) and
its matrices' weight decay (`Atom.decay`, `compile(weight_decay="auto")`)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import normgraph
from normgraph.analysis.options import (BODY_DECAY, BODY_MASS, BODY_REFERENCE_ATOMS, STREAM_READER_DECAY,
                                        WEIGHTED_BRANCH_DECAY)

DECAY = 0.05  # a body decay set by hand (the default, BODY_DECAY, is 0: docs/concepts.md §5, rule 6)
from normgraph.io.annotations import dumps, loads

from test_analyze import ResidualMLP
from test_scale import IDS, PreNorm

BODY = ("ln.", "w1.", "w2.")


def _n_eff(L: int) -> float:
    """Body of PreNorm(L): per block a gain (kind mass 0.1) and two matrices (1 each), all
    rescaled by the same factor to share BODY_MASS, which n_eff = (Σm)²/Σm² does not see."""
    return (2.1 * L) ** 2 / (2.01 * L)


@pytest.mark.parametrize("L", [1, 4, 16])
def test_body_budgets_are_scaled_by_sqrt_of_n_eff_over_the_reference(L):
    # rule 7 off and no cap (one block's few atoms get budgets above max_budget): the quadrature alone
    ng = normgraph.analyze(PreNorm(L), IDS, body_profile="measured", max_budget=None)
    plain = normgraph.analyze(PreNorm(L), IDS, body_reference=None, body_profile="measured", max_budget=None)
    factor = math.sqrt(_n_eff(L) / BODY_REFERENCE_ATOMS)
    total = sum(a.mass for a in ng.atoms.values())
    assert total == pytest.approx(BODY_MASS + 2.1)  # masses are untouched: only budgets scale
    for name, a in ng.atoms.items():
        inside = name.startswith(BODY)
        assert a.budget_scale == pytest.approx(factor if inside else 1.0)
        assert a.budget == pytest.approx(a.mass / total / a.downstream * a.budget_scale)
        assert a.budget == pytest.approx(plain.atoms[name].budget * (factor if inside else 1.0))
        assert plain.atoms[name].budget_scale == 1.0
    assert any("quadrature" in n for n in ng.diagnostics.notes)


def test_body_reference_is_a_choice_and_is_validated():
    ng = normgraph.analyze(PreNorm(2), IDS, body_reference=_n_eff(2), body_profile="measured")  # × 1
    assert ng.atoms["w1.0.weight"].budget_scale == pytest.approx(1.0)
    ten = normgraph.analyze(PreNorm(2), IDS, body_reference=10, body_profile="measured")
    assert ten.atoms["w2.1.weight"].budget_scale == pytest.approx(math.sqrt(_n_eff(2) / 10))
    for bad in (0, -1, float("nan"), "big"):
        with pytest.raises(ValueError, match="body_reference"):
            normgraph.analyze(PreNorm(1), IDS, body_reference=bad)


def test_matrices_inside_residual_branches_are_marked_for_decay_and_nothing_else():
    assert BODY_DECAY == 0.0  # by default plain branches do not decay
    assert {a.decay for a in normgraph.analyze(PreNorm(3), IDS).atoms.values()} == {0.0}
    ng = normgraph.analyze(PreNorm(3), IDS, body_decay=DECAY)
    for name, a in ng.atoms.items():
        want = DECAY if name.startswith(("w1.", "w2.")) else 0.0  # not the gains, the table, the head
        assert a.decay == want, name
    assert "decay" in ng.table().splitlines()[0]
    # modula's convex residuals: designed masses (no body, no quadrature), but the matrices
    # inside the weighted branches still decay; the stream they sum keeps scale 1, so `out` does not
    convex = normgraph.analyze(ResidualMLP(3), (torch.randn(4, 8),))
    assert {a.budget_scale for a in convex.atoms.values()} == {1.0}
    for name, a in convex.atoms.items():
        assert a.decay == (WEIGHTED_BRANCH_DECAY if name.startswith(("f1.", "f2.")) else 0.0), name
    # the modula mode keeps modula exactly: nothing decays
    modula = normgraph.analyze(PreNorm(3), IDS, sensitivity="modula")
    assert {a.decay for a in modula.atoms.values()} == {0.0}
    assert {a.budget_scale for a in modula.atoms.values()} == {1.0}
    assert "decay" not in modula.table().splitlines()[0]


def _step(model: torch.nn.Module, weight_decay, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    opt = normgraph.compile(model, IDS, lr=0.5, momentum=0.0, weight_decay=weight_decay, compile_mode="eager",
                            body_decay=DECAY)
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt


def test_auto_weight_decay_decays_each_parameter_by_its_atoms_decay():
    torch.manual_seed(0)
    base = PreNorm(2)
    grads = {n: torch.randn_like(p) for n, p in base.named_parameters()}
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    runs = {}
    for wd in ("auto", 0.0, 0.01):
        model = PreNorm(2)
        model.load_state_dict(base.state_dict())
        runs[wd] = _step(model, wd, grads)
    auto, opt = runs["auto"]
    none, _ = runs[0.0]
    every, every_opt = runs[0.01]
    for n in start:
        decay = DECAY if n.startswith(("w1.", "w2.")) else 0.0
        assert opt.group(n)["weight_decay"] == decay
        assert every_opt.group(n)["weight_decay"] == 0.01
        # W ← W·(1 − lr·wd) − lr·update: the runs differ by exactly lr·wd·W
        torch.testing.assert_close(auto[n], none[n] - 0.5 * decay * start[n])
        torch.testing.assert_close(every[n], none[n] - 0.5 * 0.01 * start[n])
    # the groups' decays live in the state dict
    fresh = normgraph.compile(PreNorm(2), IDS, weight_decay=0.0, compile_mode="eager")
    fresh.load_state_dict(opt.state_dict())
    assert fresh.group("w1.0.weight")["weight_decay"] == DECAY
    with pytest.raises(ValueError, match="weight_decay"):
        normgraph.compile(PreNorm(1), IDS, weight_decay="lots")
    with pytest.raises(ValueError, match="weight_decay"):
        normgraph.compile(PreNorm(1), IDS, weight_decay=-0.1)


def test_annotations_keep_scale_and_decay_and_older_files_load_without_them():
    ng = normgraph.analyze(PreNorm(3), IDS, body_decay=DECAY)
    back = loads(dumps(ng))
    for n, a in ng.atoms.items():
        assert (back.atoms[n].budget_scale, back.atoms[n].decay, back.atoms[n].budget) == (
            a.budget_scale, a.decay, a.budget)
    doc = json.loads(dumps(ng))
    for item in doc["atoms"]:  # a file written before these fields: plain budgets, no decay
        del item["budget_scale"], item["decay"]
    with pytest.warns(UserWarning, match="budget"):  # its stored budgets disagree: recomputed
        old = loads(json.dumps(doc))
    assert {a.decay for a in old.atoms.values()} == {0.0}
    for n, a in old.atoms.items():
        assert a.budget == pytest.approx(a.mass / old.total_mass / a.downstream)
    doc["atoms"][0]["decay"] = -1
    with pytest.raises(normgraph.io.annotations.AnnotationError, match="decay"):
        loads(json.dumps(doc))
    doc["atoms"][0]["decay"] = 0.0
    doc["atoms"][0]["budget_scale"] = 0
    with pytest.raises(normgraph.io.annotations.AnnotationError, match="budget_scale"):
        loads(json.dumps(doc))


class NoFinalNorm(PreNorm):
    """PreNorm whose head reads the residual stream itself (a ResNet's pooled classifier)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for ln, w1, w2 in zip(self.ln, self.w1, self.w2):
            x = x + w2(torch.relu(w1(ln(x))))
        return self.head(x)


def test_a_head_that_reads_the_unnormalised_stream_decays_one_after_a_norm_does_not():
    """Stream after L plain joins: scale √(L+1) > STREAM_INPUT_SCALE; after ln_f: 1."""
    from normgraph.analysis.default import STREAM_INPUT_SCALE
    assert 1.0 < STREAM_INPUT_SCALE < math.sqrt(2)
    bare = normgraph.analyze(NoFinalNorm(2), IDS)
    assert bare.atoms["head.weight"].decay == STREAM_READER_DECAY
    assert bare.atoms["head.weight"].downstream == pytest.approx(math.sqrt(3))  # = its input's scale
    assert bare.atoms["emb.weight"].decay == 0.0
    assert any("unnormalised stream" in n for n in bare.diagnostics.notes)
    normed = normgraph.analyze(PreNorm(2), IDS)
    assert normed.atoms["head.weight"].decay == 0.0


def test_body_decay_sets_the_marked_decay_and_is_validated():
    ng = normgraph.analyze(PreNorm(2), IDS, body_decay=0.1)
    assert {n: a.decay for n, a in ng.atoms.items() if a.decay} == {
        n: 0.1 for n in ng.atoms if n.startswith(("w1.", "w2."))}
    assert {a.decay for a in normgraph.analyze(PreNorm(2), IDS, body_decay=0).atoms.values()} == {0.0}
    opt = normgraph.compile(PreNorm(2), IDS, body_decay=0.1, compile_mode="eager")  # reaches analyze
    assert opt.group("w2.1.weight")["weight_decay"] == 0.1 and opt.group("head.weight")["weight_decay"] == 0.0
    for bad in (-0.1, float("inf"), "more"):
        with pytest.raises(ValueError, match="body_decay"):
            normgraph.analyze(PreNorm(1), IDS, body_decay=bad)
