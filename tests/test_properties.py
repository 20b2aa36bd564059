"""Property-based checks (hypothesis): every duality map on any shape, dtype and magnitude, and
random damage to an annotations file (issue 13's property suite).

Properties:
- a duality map of a finite gradient is finite, and its norm in the atom's norm is the budget:
  exactly (to the dtype's rounding) for SVD and the elementwise maps, within the documented
  [0.6, 1.25] band for quintic Newton–Schulz (docs/newton_schulz.md); a zero gradient gives 0;
- loading a randomly mutated annotations file either works or raises `AnnotationError`.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import normgraph
from normgraph.io.annotations import AnnotationError, loads
from normgraph.codegen.dual import dualize_atom
from normgraph.core.layout import atom_norm, matrix_options
from normgraph.core import Atom

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MAGNITUDES = [0.0, 1e-30, 1e-10, 1e-3, 1.0, 1e3, 1e10, 1e20, 1e30]
#: relative rounding of the update's norm in each dtype (the map works in float32 or wider)
ROUNDING = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 2e-3}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def gradients(draw) -> torch.Tensor:
    m, n = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from(MAGNITUDES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    g = (torch.randn(m, n, generator=gen, dtype=torch.float64) * scale).to(dtype)
    assume(bool(torch.isfinite(g).all()))  # fp16 cannot hold 1e10: not a finite gradient
    return g


def atom_for(kind: str, shape: tuple[int, int]) -> Atom:
    m, n = shape
    options = matrix_options([m, n], [0, 1], 1, m, n) if kind == "linear" else {}
    return Atom(name="p", kind=kind, shape=shape, budget=0.37, fan_in=n, fan_out=m, options=options)


@SETTINGS
@given(g=gradients(), kind=st.sampled_from(["embedding", "gain", "bias"]))
@example(g=torch.full((3, 4), 1000.0, dtype=torch.float16), kind="bias")     # squares overflow fp16
@example(g=torch.full((3, 4), 1e25, dtype=torch.float32), kind="embedding")  # and fp32
def test_elementwise_maps_are_finite_and_have_the_budget_as_norm(g, kind):
    atom = atom_for(kind, tuple(g.shape))
    u = dualize_atom(atom, g)
    assert u.dtype == g.dtype and bool(torch.isfinite(u).all())
    if not bool(g.any()):
        assert not bool(u.any())
        return
    if kind == "embedding":  # rows that were all zero stay 0; the norm is the largest row's
        assert atom_norm(atom, u) == pytest.approx(atom.budget, rel=ROUNDING[g.dtype])
    else:
        assert atom_norm(atom, u) == pytest.approx(atom.budget, rel=ROUNDING[g.dtype])


@SETTINGS
@given(g=gradients(), orthogonalizer=st.sampled_from(["svd", "newton-schulz"]))
@example(g=torch.randn(4, 6) * 1e30, orthogonalizer="newton-schulz")
@example(g=(torch.randn(4, 6) * 1e30).bfloat16(), orthogonalizer="newton-schulz")
def test_orthogonalization_is_finite_and_has_the_budget_as_norm(g, orthogonalizer):
    atom = atom_for("linear", tuple(g.shape))
    u = dualize_atom(atom, g, orthogonalizer=orthogonalizer)
    assert u.dtype == g.dtype and bool(torch.isfinite(u).all())
    if not bool(g.any()):
        assert not bool(u.any())
        return
    ratio = atom_norm(atom, u) / atom.budget
    if orthogonalizer == "svd":
        assert ratio == pytest.approx(1.0, rel=max(ROUNDING[g.dtype], 1e-4))
    else:
        assert 0.6 * (1 - ROUNDING[g.dtype]) <= ratio <= 1.25 * (1 + ROUNDING[g.dtype])


# --- annotations -----------------------------------------------------------------------------

def _valid_doc() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    return json.loads(normgraph.io.annotations.dumps(normgraph.analyze(model, (torch.randn(2, 3),))))


VALID = _valid_doc()
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _paths(doc, prefix=()):
    """Every (container, key) in the document, to mutate one of them."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


PATHS = list(_paths(VALID))


@settings(max_examples=150, deadline=None)
@given(path=st.sampled_from(PATHS), action=st.sampled_from(["replace", "delete", "add"]),
       value=JSON_VALUES)
def test_a_mutated_annotations_file_loads_or_raises_annotation_error(path, action, value):
    doc = copy.deepcopy(VALID)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent["unexpected_" + str(last)] = value
    else:
        parent.append(value)
    text = json.dumps(doc)
    try:
        ng = loads(text)
    except AnnotationError:
        return
    for atom in ng.atoms.values():  # what loads is usable: finite, non-negative budgets
        assert math.isfinite(atom.budget) and atom.budget >= 0
