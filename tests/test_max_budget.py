"""The default's budget cap (`max_budget`): a reading that makes an atom's output look far
less sensitive than it is must not give that atom a step larger than the weight itself."""
from __future__ import annotations

import math

import pytest
import torch

import normgraph
from normgraph.core.graph import budget_of
from test_scale import IDS, PreNorm


class ScaledLogits(PreNorm):
    """`PreNorm` (two plain residual blocks) with its logits multiplied by a constant, as
    Cohere's `logit_scale` (0.0625) does: every downstream shrinks by the constant and every
    budget grows by its inverse."""

    def __init__(self, logit_scale: float) -> None:
        super().__init__(L=2)
        self.logit_scale = logit_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.logit_scale


def analyze(logit_scale: float, **kw) -> normgraph.NormGraph:
    torch.manual_seed(0)
    return normgraph.analyze(ScaledLogits(logit_scale), IDS, **kw)


def test_budgets_above_the_cap_are_capped_and_the_rest_left_alone():
    free = analyze(1 / 64, max_budget=None)
    capped = analyze(1 / 64)
    over = {n for n, a in free.atoms.items() if a.budget > 0.5}
    assert over, "the test needs budgets above the cap"
    for name, atom in capped.atoms.items():
        if name in over:
            assert atom.budget == pytest.approx(0.5)
            assert "capped at max_budget 0.5" in atom.note
        else:
            assert atom.budget == free.atoms[name].budget  # bit for bit
    assert any("budgets capped at max_budget 0.5" in n for n in capped.diagnostics.notes)


def test_a_capped_budget_stays_derived_from_its_mass():
    """The cap lowers `budget_scale`, so budget = mass / total / downstream × budget_scale
    still holds, and an annotations file round-trips without a warning."""
    ng = analyze(1 / 64)
    total = sum(a.mass for a in ng.atoms.values())
    for atom in ng.atoms.values():
        assert atom.budget == pytest.approx(budget_of(atom.mass, total, atom.downstream, atom.budget_scale), rel=1e-12)


def test_the_cap_does_not_bind_on_unscaled_logits_or_in_other_modes():
    plain = analyze(1.0)
    assert max(a.budget for a in plain.atoms.values()) < 0.5
    assert plain.atoms["w1.0.weight"].budget == analyze(1.0, max_budget=None).atoms["w1.0.weight"].budget
    scale = analyze(1 / 64, sensitivity="scale")
    assert max(a.budget for a in scale.atoms.values()) > 0.5  # only the default ("hybrid") caps


def test_max_budget_is_validated():
    with pytest.raises(ValueError, match="max_budget"):
        analyze(1.0, max_budget=0)
    with pytest.raises(ValueError, match="max_budget"):
        analyze(1.0, max_budget=math.nan)


def test_capped_budgets_round_trip_through_annotations(tmp_path):
    import warnings
    ng = analyze(1 / 64)
    ng.save(tmp_path / "ng.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = normgraph.load(tmp_path / "ng.json")
    assert {n: a.budget for n, a in back.atoms.items()} == {n: a.budget for n, a in ng.atoms.items()}
