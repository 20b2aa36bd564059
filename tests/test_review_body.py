"""Review of the hybrid-mode body mass, gates and tied-head changes: edge cases."""
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn as nn

import normgraph


def _analyze(model, inputs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return normgraph.analyze(model, inputs, **kw)


class _Doubling(nn.Module):
    """`h + h` twice: no residual branch anywhere."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(d, d, bias=False) for _ in range(3))

    def forward(self, x):
        h = self.a(x)
        h = h + h
        h = self.b(h)
        h = h + h
        return self.c(h)


def test_doubling_is_not_a_residual_body():
    # before the fix, `b` (between two `h + h`) was taken for the body and got mass 8
    ng = _analyze(_Doubling(), (torch.randn(2, 8),))
    assert {n: a.mass for n, a in ng.atoms.items()} == {"a.weight": 1.0, "b.weight": 1.0, "c.weight": 1.0}
    assert not any("residual body" in n for n in ng.diagnostics.notes)


class _Masked(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.a, self.b = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x, mask):
        return self.b(self.a(x) * mask)


class _Plain(_Masked):
    def forward(self, x):
        return self.b(self.a(x))


def test_float_mask_input_is_not_a_gate():
    # multiplying by a float mask passed in as an input is not a bilinear gate: before the
    # fix `a`'s downstream was halved (0.5 against 1 without the mask)
    x = torch.randn(2, 8)
    masked = _analyze(_Masked(), (x, torch.ones(2, 8)))
    plain = _analyze(_Plain(), (x,))
    assert masked.atoms["a.weight"].downstream == pytest.approx(plain.atoms["a.weight"].downstream)


class _Gated(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.g, self.u, self.o = (nn.Linear(d, d, bias=False) for _ in range(3))

    def forward(self, x):
        return self.o(torch.nn.functional.silu(self.g(x)) * self.u(x))


def test_swiglu_still_a_gate():
    ng = _analyze(_Gated(), (torch.randn(2, 8),))
    assert ng.atoms["g.weight"].downstream == pytest.approx(0.5 * ng.atoms["o.weight"].downstream, rel=0.3)


class _TiedEinsum(nn.Module):
    def __init__(self, V=32, d=16):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.l = nn.Linear(d, d)

    def forward(self, t):
        h = self.emb(t)
        h = h + self.l(torch.relu(h))
        return torch.einsum("btd,vd->btv", h, self.emb.weight)


def test_tied_einsum_head_same_in_both_front_ends():
    t = torch.randint(0, 32, (2, 5))
    model = _TiedEinsum()
    exp = _analyze(model, (t,), frontend="export").atoms["emb.weight"].downstream
    sym = _analyze(model, (t,), frontend="symbolic_trace").atoms["emb.weight"].downstream
    assert exp == pytest.approx(sym)
    # the same head written as a linear: the equation's contracted d = 16 is the linear's fan-in
    assert exp == pytest.approx(_analyze(_TiedAsLinear(), (t,)).atoms["emb.weight"].downstream)


class _TiedAsLinear(_TiedEinsum):
    def forward(self, t):
        h = self.emb(t)
        h = h + self.l(torch.relu(h))
        return F.linear(h, self.emb.weight)


class _DeepRMS(nn.Module):
    """x ← x + W(x · rsqrt(mean(x²))): every norm is a product of the stream with a function
    of it, so the gate check walks the stream back to the input (a chain as deep as the model)."""

    def __init__(self, L: int, d: int = 4) -> None:
        super().__init__()
        self.w = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(L))

    def forward(self, x):
        for w in self.w:
            x = x + w(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        return x


def test_deep_plain_residual_model_analyzes_without_recursion_error():
    """A 128-layer Llama raised RecursionError in the gate check; the walk is now iterative."""
    ng = _analyze(_DeepRMS(800), (torch.randn(2, 4),), frontend="symbolic_trace")
    assert len(ng.atoms) == 800 and all(a.budget > 0 for a in ng.atoms.values())
