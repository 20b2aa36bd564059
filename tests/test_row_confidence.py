"""Embedding rows scaled by their confidence (`row_confidence`, docs/concepts.md §7): the ratio
is hand-derived, the update keeps its ℓ1→RMS norm, "auto" takes the untied tables, and the
state round-trips."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import normgraph
from normgraph.core import layout
from normgraph.optim import NormGraphOptimizer, row_confidences

EAGER = dict(compile_mode="eager")


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(4, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(tokens))


def setup(**kwargs) -> tuple[TokenModel, NormGraphOptimizer]:
    torch.manual_seed(0)
    model = TokenModel().double()
    ng = normgraph.analyze(model, (torch.tensor([[0, 1, 2, 3]]),))
    kwargs.setdefault("row_confidence", True)
    return model, NormGraphOptimizer(model, ng, lr=0.1, weight_decay=0.0, **EAGER, **kwargs)


def feed(model: TokenModel, step: int) -> None:
    """Row 0: the same gradient every step; row 1: the same with alternating sign; row 2:
    fresh noise; row 3: never used (zero)."""
    g = torch.zeros(4, 16, dtype=torch.float64)
    fixed = torch.linspace(-1, 1, 16, dtype=torch.float64)
    g[0] = fixed
    g[1] = fixed * (-1) ** step
    g[2] = torch.randn(16, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
    model.emb.weight.grad = g
    model.head.weight.grad = torch.ones_like(model.head.weight)
    model.head.bias.grad = torch.ones_like(model.head.bias)


def row_rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(dim=1).sqrt()


def test_a_consistent_row_moves_by_the_budget_a_noisy_one_less_and_the_norm_is_the_budget() -> None:
    model, opt = setup()
    atom = opt.norm_graph.atoms["emb.weight"]
    for step in range(12):
        feed(model, step)
        before = model.emb.weight.detach().clone()
        opt.step()
    move = before - model.emb.weight.detach()
    rms = row_rms(move) / (0.1 * atom.budget)
    assert math.isclose(rms[0].item(), 1.0, rel_tol=1e-9)  # a fixed gradient: ratio 1, the largest
    assert rms[1].item() < 0.1  # its sign flips every step: momentum cancels it
    assert 0.0 < rms[2].item() < 0.9  # noise: in between
    assert rms[3].item() == 0.0  # no gradient ever: no step
    # the update's norm (its largest row RMS) is still the budget
    assert math.isclose(layout.atom_norm(atom, move) / (0.1 * atom.budget), 1.0, rel_tol=1e-9)


def test_without_it_every_row_with_a_gradient_moves_by_the_budget() -> None:
    model, opt = setup(row_confidence=False)
    atom = opt.norm_graph.atoms["emb.weight"]
    for step in range(5):
        feed(model, step)
        before = model.emb.weight.detach().clone()
        opt.step()
    rms = row_rms(before - model.emb.weight.detach()) / (0.1 * atom.budget)
    torch.testing.assert_close(rms[:3], torch.ones(3, dtype=torch.float64))
    assert "row_moment" not in opt.state[model.emb.weight]


def test_ratio_is_one_for_a_fixed_gradient_and_matches_the_closed_form_for_a_flipping_one() -> None:
    m, steps = 0.9, 40
    g = torch.tensor([[1.0, -2.0, 3.0], [1.0, -2.0, 3.0]], dtype=torch.float64)
    buf, moment = torch.zeros_like(g), torch.zeros(2, dtype=torch.float64)
    for t in range(1, steps + 1):
        grad = g * torch.tensor([[1.0], [(-1.0) ** t]], dtype=torch.float64)
        buf.lerp_(grad, 1 - m)
        (factors,) = row_confidences([grad], [buf], [moment], [m], [t])
    # row 1's EMA of an alternating ±g: Σ_k (1−m) m^k (−1)^k → (1−m)/(1+m) of g, up to m^t
    ema = (1 - m) * sum(m ** k * (-1) ** k for k in range(steps))
    expected = abs(ema) / (1 - m ** steps)  # the mean square is constant: v̂ = g²
    assert math.isclose(factors[0].item(), 1.0, rel_tol=1e-12)
    assert math.isclose(factors[1].item(), expected, rel_tol=1e-9)


def test_momentum_zero_leaves_every_row_at_the_budget() -> None:
    model, opt = setup(momentum=0.0)
    atom = opt.norm_graph.atoms["emb.weight"]
    feed(model, 3)
    before = model.emb.weight.detach().clone()
    opt.step()
    rms = row_rms(before - model.emb.weight.detach()) / (0.1 * atom.budget)
    torch.testing.assert_close(rms[:3], torch.ones(3, dtype=torch.float64))


def test_state_dict_round_trip_continues_the_same_steps() -> None:
    model, opt = setup()
    for step in range(3):
        feed(model, step)
        opt.step()
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert opt.state[model.emb.weight]["row_step"] == 3
    twin, twin_opt = setup()
    twin.load_state_dict(saved_model)
    twin_opt.load_state_dict(saved_state)
    for step in range(3, 6):
        feed(model, step)
        feed(twin, step)
        opt.step()
        twin_opt.step()
    torch.testing.assert_close(twin.emb.weight, model.emb.weight, rtol=0, atol=0)


def test_a_state_dict_from_before_keeps_the_step_it_was_taking() -> None:
    model, opt = setup()
    state = opt.state_dict()
    for g in state["param_groups"]:
        del g["row_confidence"]  # as saved before the option existed
    _, other = setup()
    other.load_state_dict(state)
    assert all(g["row_confidence"] is False for g in other.param_groups)


def test_a_skipped_step_leaves_the_row_moments() -> None:
    model, opt = setup()
    feed(model, 0)
    opt.step()
    moment = opt.state[model.emb.weight]["row_moment"].clone()
    feed(model, 1)
    model.emb.weight.grad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    assert opt.last_step_skipped
    assert opt.state[model.emb.weight]["row_step"] == 1
    torch.testing.assert_close(opt.state[model.emb.weight]["row_moment"], moment, rtol=0, atol=0)


class TiedModel(nn.Module):
    """A token table that is also the output head, and an untied position table."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(6, 8)
        self.pos = nn.Embedding(4, 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[-1]))
        return h @ self.tok.weight.t()


def test_auto_takes_the_untied_tables_and_compile_passes_every_choice_on() -> None:
    model = TiedModel()
    example = (torch.tensor([[0, 1, 2, 3]]),)

    def chosen(**kw):
        return {g["name"]: g["row_confidence"] for g in normgraph.compile(model, example, **EAGER, **kw).param_groups}
    assert chosen() == {"tok.weight": False, "pos.weight": True}  # the default: "auto"
    assert "tok.weight" in normgraph.analyze(model, example).diagnostics.tied
    assert chosen(row_confidence=True) == {"tok.weight": True, "pos.weight": True}
    assert chosen(row_confidence=False) == {"tok.weight": False, "pos.weight": False}
    with pytest.raises(ValueError, match="row_confidence='yes'"):
        normgraph.compile(model, example, row_confidence="yes", **EAGER)


def test_one_table_can_be_switched_at_run_time() -> None:
    model, opt = setup(row_confidence=False)
    opt.group("emb.weight")["row_confidence"] = True
    feed(model, 0)
    opt.step()
    assert opt.state[model.emb.weight]["row_step"] == 1


def test_auto_reads_the_tied_tables_from_saved_annotations(tmp_path) -> None:
    model = TiedModel()
    ng = normgraph.analyze(model, (torch.tensor([[0, 1, 2, 3]]),))
    ng.save(tmp_path / "ng.json")
    opt = normgraph.compile(model, annotations=tmp_path / "ng.json", **EAGER)
    assert {g["name"]: g["row_confidence"] for g in opt.param_groups} == {"tok.weight": False, "pos.weight": True}


def test_bf16_tables_keep_fp32_moments_and_finite_steps() -> None:
    torch.manual_seed(0)
    model = TokenModel().to(torch.bfloat16)
    tokens = torch.tensor([[0, 1, 2, 3]])
    opt = normgraph.compile(model, (tokens,), lr=0.1, **EAGER)
    for _ in range(3):
        opt.zero_grad()
        model(tokens).float().square().mean().backward()
        opt.step()
    state = opt.state[model.emb.weight]
    assert state["row_moment"].dtype == torch.float32 and state["row_step"] == 3
    assert torch.isfinite(model.emb.weight.float()).all()
