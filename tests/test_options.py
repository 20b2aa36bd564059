"""`AnalysisOptions`: one object for the default's switches; keywords are a shorthand for it."""
from __future__ import annotations

import dataclasses

import pytest

import normgraph
from normgraph import AnalysisOptions

from test_scale import IDS, PreNorm


def test_keywords_are_the_options_object():
    a = normgraph.analyze(PreNorm(2), IDS, body_decay=0.05, body_profile="measured")
    b = normgraph.analyze(PreNorm(2), IDS, options=AnalysisOptions(body_decay=0.05, body_profile="measured"))
    c = normgraph.analyze(PreNorm(2), IDS, options=AnalysisOptions(body_profile="measured"), body_decay=0.05)
    for n in a.atoms:
        assert a.atoms[n].budget == b.atoms[n].budget == c.atoms[n].budget
        assert a.atoms[n].decay == b.atoms[n].decay == c.atoms[n].decay
    opt = normgraph.compile(PreNorm(2), IDS, compile_mode="eager", options=AnalysisOptions(body_decay=0.05))
    assert opt.group("w1.0.weight")["weight_decay"] == 0.05


def test_defaults_are_the_default():
    plain = normgraph.analyze(PreNorm(2), IDS)
    explicit = normgraph.analyze(PreNorm(2), IDS, options=AnalysisOptions())
    assert {n: a.budget for n, a in plain.atoms.items()} == {n: a.budget for n, a in explicit.atoms.items()}


def test_unknown_and_bad_switches_are_named():
    with pytest.raises(TypeError, match="unknown analysis option.*body_weight.*body_mass"):
        normgraph.analyze(PreNorm(1), IDS, body_weight=3)
    bad = {"conv_mode": "sideways", "body_profile": "bumpy", "stems": "yes", "fused_projections": 1,
           "body_mass": -1, "body_reference": "big", "body_decay": float("nan"), "position_table_mass": 0,
           "tied_head_norm_mass": -0.3, "stream_reader_decay": -1, "weighted_branch_decay": float("inf")}
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            AnalysisOptions(**{name: value})
    with pytest.raises(ValueError, match="body_mass"):
        normgraph.analyze(PreNorm(1), IDS, sensitivity="modula", body_mass=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        AnalysisOptions().stems = False  # type: ignore[misc]


@pytest.mark.parametrize("switch", ["fused_projections", "attention_patterns", "table_multipliers", "stems",
                                    "channel_convs"])
def test_each_step_can_be_turned_off(switch):
    """Off, a step leaves an analysis it does not apply to unchanged (PreNorm has no fused,
    written-out, scaled-table, stem or BatchNorm pattern)."""
    on = normgraph.analyze(PreNorm(2), IDS)
    off = normgraph.analyze(PreNorm(2), IDS, **{switch: False})
    assert {n: a.budget for n, a in on.atoms.items()} == {n: a.budget for n, a in off.atoms.items()}
