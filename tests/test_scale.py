"""The default "scale" sensitivity mode (issue 10) and the rule fixes found on real models."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import normgraph

from test_analyze import ResidualMLP


class PreNorm(nn.Module):
    """x0 = emb(ids); x_{l+1} = x_l + W2·relu(W1·LN(x_l)); logits = head(LN(x_L)): plain residuals."""

    def __init__(self, L: int = 1, d: int = 8, vocab: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln = nn.ModuleList(nn.LayerNorm(d, bias=False) for _ in range(L))
        self.w1 = nn.ModuleList(nn.Linear(d, 2 * d, bias=False) for _ in range(L))
        self.w2 = nn.ModuleList(nn.Linear(2 * d, d, bias=False) for _ in range(L))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for ln, w1, w2 in zip(self.ln, self.w1, self.w2):
            x = x + w2(torch.relu(w1(ln(x))))
        return self.head(self.ln_f(x))


IDS = (torch.randint(0, 16, (2, 5)),)


def test_prenorm_budgets_by_hand():
    """Scales: S(x0) = 1, the branch adds 1, so S(x1) = 2 and ln_f has sensitivity 1/2.
    D(x1) = 1/2 = D(w2 out) = D(w1 out) = D(ln.0 out); D(x0) = 1/2 (skip) + 1/2 · 1/S(x0) = 1."""
    ng = normgraph.analyze(PreNorm(), IDS, sensitivity="scale")
    down = {n: a.downstream for n, a in ng.atoms.items()}
    assert down == pytest.approx({"emb.weight": 1.0, "ln.0.weight": 0.5, "w1.0.weight": 0.5,
                                  "w2.0.weight": 0.5, "ln_f.weight": 1.0, "head.weight": 1.0})
    total = 4 * 1.0 + 2 * 0.1
    for name, atom in ng.atoms.items():
        assert atom.budget == pytest.approx(atom.mass / total / down[name]), name
    # modula's algebra reads every activation as unit-sized: D(x0) = 1 + 1 = 2
    modula = normgraph.analyze(PreNorm(), IDS, sensitivity="modula")
    assert modula.atoms["emb.weight"].downstream == pytest.approx(2.0)
    assert modula.atoms["w2.0.weight"].downstream == pytest.approx(1.0)


def test_typical_mode_combines_paths_and_sums_in_quadrature():
    """sensitivity="typical": S(x1) = √(1 + 1), ln_f has sensitivity 1/√2, so D(x1) = 1/√2;
    D(x0) = √((1/√2)² + (1/√2)²) = 1 (skip and branch in quadrature)."""
    ng = normgraph.analyze(PreNorm(), IDS, sensitivity="typical")
    r = 2 ** -0.5
    assert {n: a.downstream for n, a in ng.atoms.items()} == pytest.approx(
        {"emb.weight": 1.0, "ln.0.weight": r, "w1.0.weight": r, "w2.0.weight": r,
         "ln_f.weight": 1.0, "head.weight": 1.0})
    deep = normgraph.analyze(PreNorm(16), IDS, sensitivity="typical")
    b = [a.budget for a in deep.atoms.values() if a.kind in ("linear", "embedding")]
    assert max(b) / min(b) < 16  # flatter than "scale" (≈ L)


def test_plain_residual_depth_is_polynomial_not_exponential():
    """Budgets of a 16-block plain residual stack stay within ~L of each other ("scale"); with
    modula's algebra they halve per block (the issue's failure)."""
    L = 16
    scale = normgraph.analyze(PreNorm(L), IDS, sensitivity="scale")
    b = [a.budget for n, a in scale.atoms.items() if a.kind in ("linear", "embedding")]
    assert max(b) / min(b) < 2 * (L + 1)
    with pytest.warns(UserWarning, match="budgets span"):
        modula = normgraph.analyze(PreNorm(L), IDS, sensitivity="modula")
    m = [a.budget for n, a in modula.atoms.items() if a.kind in ("linear", "embedding")]
    assert max(m) / min(m) >= 2 ** (L - 1)
    assert any("grows most at" in note for note in modula.diagnostics.notes)


@pytest.mark.parametrize("L", [1, 4])
def test_scale_mode_equals_modula_on_convex_residuals(L):
    """On a modula-shaped network every scale is 1: the two modes agree exactly."""
    x = (torch.randn(2, 8),)
    a = normgraph.analyze(ResidualMLP(L), x)
    b = normgraph.analyze(ResidualMLP(L), x, sensitivity="modula")
    for name in a.atoms:
        assert a.atoms[name].budget == pytest.approx(b.atoms[name].budget, rel=1e-12), name


def test_post_norm_is_not_exponential():
    class PostNorm(PreNorm):
        def forward(self, ids):
            x = self.emb(ids)
            for ln, w1, w2 in zip(self.ln, self.w1, self.w2):
                x = ln(x + w2(torch.relu(w1(x))))
            return self.head(x)

    ng = normgraph.analyze(PostNorm(12), IDS)
    b = [a.budget for a in ng.atoms.values() if a.kind in ("linear", "embedding")]
    assert max(b) / min(b) < 10  # each block: (1 + 1) / S(x + f) = 1


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="sensitivity='worst'"):
        normgraph.analyze(PreNorm(), IDS, sensitivity="worst")


def test_compile_takes_the_mode():
    opt = normgraph.compile(PreNorm(), IDS, compile_mode="eager", sensitivity="modula")
    assert opt.norm_graph.atoms["emb.weight"].downstream == pytest.approx(2.0)


# --- rules found wrong on real models ------------------------------------------------------

class Cast(nn.Module):
    """Llama's RMSNorm ends in `weight * x.to(dtype)`; `type_as`/`expand_as` read only metadata."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.g = nn.Parameter(torch.ones(4))

    def forward(self, x):
        h = self.a(x)
        return self.g.type_as(h) * h + torch.zeros(1).expand_as(h).type_as(h)


@pytest.mark.parametrize("mode", ["scale", "modula"])
def test_metadata_arguments_carry_no_signal(mode):
    ng = normgraph.analyze(Cast(), (torch.randn(2, 4),), sensitivity=mode)
    assert ng.atoms["a.weight"].downstream == pytest.approx(1.0)  # not 2 (h read for its dtype)
    assert ng.atoms["g"].kind == "gain"
    assert not ng.diagnostics.assumed_ops and not ng.diagnostics.fallbacks


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    def __init__(self, d: int = 8, T: int = 5) -> None:
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        angle = torch.arange(T)[:, None] * torch.ones(d // 2)
        self.register_buffer("cos", torch.cat([angle.cos()] * 2, -1))
        self.register_buffer("sin", torch.cat([angle.sin()] * 2, -1))

    def forward(self, x):
        q = self.q(x)
        return q * self.cos + rotate_half(q) * self.sin


@pytest.mark.parametrize("mode", ["scale", "modula"])
def test_rotary_embedding_is_an_isometry(mode):
    model = Rotary()
    x = torch.randn(2, 5, 8)
    ng = normgraph.analyze(model, (x,), sensitivity=mode)
    assert ng.atoms["q.weight"].downstream == pytest.approx(1.0)  # the path sum said 3
    # and it is one: the rotation preserves each position's norm
    with torch.no_grad():
        torch.testing.assert_close(model(x).norm(dim=-1), model.q(x).norm(dim=-1))


def test_square_sum_and_loss_rules():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)

        def forward(self, x, y):
            return F.cross_entropy(self.a(x).square() + self.b(x).pow(2), y), self.a(x).sum(-1)

    ng = normgraph.analyze(Net(), (torch.randn(3, 4), torch.tensor([0, 1, 2])), sensitivity="modula")
    assert not ng.diagnostics.assumed_ops
    # square and pow(·, 2) agree (2 each); sum over 4 entries: 4; cross_entropy: 1
    assert ng.atoms["b.weight"].downstream == pytest.approx(2.0)
    assert ng.atoms["a.weight"].downstream == pytest.approx(2.0 + 4.0)


def test_shifted_gain_position_slice_and_metadata_use():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.randn(16, 4))
            self.gain = nn.Parameter(torch.zeros(4))
            self.router = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            h = x + self.pos[: x.shape[1]]
            h = h * (1 + self.gain)
            return h @ self.router.type(torch.float32).t()

    ng = normgraph.analyze(Net(), (torch.randn(2, 5, 4),))
    kinds = {n: a.kind for n, a in ng.atoms.items()}
    assert kinds == {"pos": "embedding", "gain": "gain", "router": "linear"}
    assert not ng.diagnostics.fallbacks


def test_shape_reads_are_not_data_paths_without_example_inputs():
    from normgraph.demo.models import GPT, GPTConfig
    model = GPT(GPTConfig(d_model=32, n_layer=2, block_size=16))
    traced = normgraph.analyze(model, sensitivity="modula")
    exported = normgraph.analyze(model, (torch.randint(0, 256, (2, 16)),), sensitivity="modula")
    assert traced.diagnostics.frontend.startswith("torch.fx")
    for name, atom in exported.atoms.items():
        assert traced.atoms[name].downstream == pytest.approx(atom.downstream, rel=1e-9), name


def test_weight_norm_conv_is_a_conv_and_upsampling_has_a_rule():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 4, 3, padding=1))

        def forward(self, x):
            return F.interpolate(self.conv(x), scale_factor=2, mode="nearest")

    ng = normgraph.analyze(Net(), (torch.randn(1, 2, 6, 6),), stems=False)  # not a stem here
    kinds = {n.rsplit(".", 1)[-1] if "original" in n else n: a.kind for n, a in ng.atoms.items()}
    assert kinds["original1"] == "conv" and kinds["original0"] == "gain"
    assert not ng.diagnostics.assumed_ops and not ng.diagnostics.fallbacks


def test_layerdrop_exports_in_eval_mode_and_restores_the_mode():
    class LayerDrop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                if self.training and torch.rand(()) < 0.5:  # data-dependent branch: export fails
                    continue
                x = layer(x)
            return x

    model = LayerDrop().train()
    ng = normgraph.analyze(model, (torch.randn(2, 4),))
    assert model.training
    assert ng.diagnostics.frontend == "torch.export"
    assert any("exported in eval mode" in n for n in ng.diagnostics.notes)


def test_real_models_have_no_astronomical_spread():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = dict(num_hidden_layers=8, hidden_size=32, intermediate_size=64, num_attention_heads=2,
               vocab_size=64)
    models = [transformers.GPT2LMHeadModel(transformers.GPT2Config(
                  n_layer=8, n_embd=32, n_head=2, vocab_size=64, n_positions=16)),
              transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=1, **cfg)),
              transformers.BertForMaskedLM(transformers.BertConfig(**cfg))]
    for model in models:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no spread warning
            ng = normgraph.analyze(model, (torch.randint(0, 64, (2, 16)),))
        b = [a.budget for a in ng.atoms.values() if a.kind in ("linear", "embedding")]
        assert max(b) / min(b) < 200, type(model).__name__
        assert not ng.diagnostics.assumed_ops, ng.diagnostics.assumed_ops


def test_register_scale_rule_overrides_one_op_in_scale_mode_only():
    from normgraph.analysis.scale import SCALE_RULES, SCALED_BOND_RULES

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.b(F.hardtanh(self.a(x)))

    x = (torch.randn(2, 4),)
    with SCALE_RULES.scoped(), SCALED_BOND_RULES.scoped():
        normgraph.register_scale_rule("hardtanh", scale=lambda node, args, S: 0.5,
                                      bond=lambda b, S: 0.25)
        ng = normgraph.analyze(Net(), x)
        assert ng.atoms["b.weight"].downstream == pytest.approx(0.5)   # b multiplies scale 0.5
        assert ng.atoms["a.weight"].downstream == pytest.approx(0.25)  # through hardtanh: 0.25
        assert normgraph.analyze(Net(), x, sensitivity="modula").atoms["a.weight"].downstream == 1.0
    assert "hardtanh" not in SCALE_RULES and "hardtanh" not in SCALED_BOND_RULES


def test_numbers_in_a_sum_count_toward_its_scale():
    """`0.5·(1 + tanh(h))` (a written-out GELU's last factor) has scale 0.5·(1 + 1) = 1: the
    constant counts; an additive mask does not."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
            self.register_buffer("mask", torch.full((4,), -1e4))

        def forward(self, x):
            return self.b(0.5 * (1 + torch.tanh(self.a(x)))) + self.mask

    ng = normgraph.analyze(Net(), (torch.randn(2, 4),), sensitivity="scale")
    assert ng.atoms["b.weight"].downstream == pytest.approx(1.0)
    assert ng.atoms["a.weight"].downstream == pytest.approx(0.5)  # b (1) · 0.5 · tanh (1)


class TiedNanoGPT(nn.Module):
    """nanoGPT's shape and init: packed QKV, plain pre-LN residuals, learned positions, tied head."""

    def __init__(self, L: int = 4, d: int = 32, vocab: int = 64, T: int = 16) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(2 * L))
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(L))
        self.proj = nn.ModuleList(nn.Linear(d, d) for _ in range(L))
        self.fc = nn.ModuleList(nn.Linear(d, 4 * d) for _ in range(L))
        self.out = nn.ModuleList(nn.Linear(4 * d, d) for _ in range(L))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for m in self.modules():  # nanoGPT's init: N(0, 0.02) tables and weights, zero biases
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                torch.nn.init.zeros_(m.bias)

    def forward(self, idx):
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for i, (qkv, proj, fc, out) in enumerate(zip(self.qkv, self.proj, self.fc, self.out)):
            q, k, v = (z.view(b, t, 2, -1).transpose(1, 2) for z in qkv(self.ln[2 * i](x)).split(x.shape[-1], 2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + proj(y.transpose(1, 2).reshape(b, t, -1))
            x = x + out(F.gelu(fc(self.ln[2 * i + 1](x))))
        return self.head(self.ln_f(x))


@pytest.mark.parametrize("mode, bound", [("scale", 100.0), ("typical", 100.0), ("hybrid", 100.0)])
def test_no_frozen_layers_after_a_few_steps(mode, bound):
    """The issue's check, small: every matrix of a tied-head plain-residual GPT moves, and the
    relative changes lie within 100× of each other (with "modula" the embedding moves 0)."""
    torch.manual_seed(0)
    model = TiedNanoGPT()
    ids = torch.randint(0, 64, (4, 16))
    opt = normgraph.compile(model, (ids,), lr=0.125, compile_mode="eager", sensitivity=mode)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 2}
    for _ in range(3):
        loss = F.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    rel = {n: float((p.detach() - before[n]).norm() / before[n].norm())
           for n, p in model.named_parameters() if n in before}
    assert min(rel.values()) > 0
    assert max(rel.values()) / min(rel.values()) < bound, rel


class FusedGQA(nn.Module):
    """One projection for q (4 heads) and k, v (1 head each): unequal parts 64 + 16 + 16."""

    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.transposed = transposed
        self.qkv = nn.Parameter(torch.randn(64, 96) / 8 if transposed else torch.randn(96, 64) / 8)
        self.o = nn.Linear(64, 64, bias=False)

    def forward(self, x):
        h = x @ self.qkv if self.transposed else F.linear(x, self.qkv)
        q, k, v = h.split([64, 16, 16], dim=-1)
        b, t, _ = x.shape
        q = q.view(b, t, 4, 16).transpose(1, 2)
        k, v = (z.view(b, t, 1, 16).transpose(1, 2).expand(b, 4, t, 16) for z in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, 64))


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_projection_with_unequal_parts_is_orthogonalized_per_part(transposed, tmp_path):
    from normgraph.codegen.dual import dualize_atom
    from normgraph.core.layout import atom_norm
    model = FusedGQA(transposed)
    x = torch.randn(2, 5, 64)
    ng = normgraph.analyze(model, (x,))
    atom = ng.atoms["qkv"]
    assert atom.kind == "linear" and "64 + 16 + 16" in atom.note
    assert [(p["start"], p["size"]) for p in atom.options["parts"]] == [(0, 64), (64, 16), (80, 16)]
    opt = normgraph.compile(model, (x,), compile_mode="eager", orthogonalizer="svd")
    g = torch.randn(atom.shape, dtype=torch.float64).float()
    u = opt.dualize([g, torch.randn(64, 64)])[0]
    torch.testing.assert_close(u, dualize_atom(atom, g, orthogonalizer="svd"), rtol=1e-5, atol=1e-6)
    assert atom_norm(atom, u) == pytest.approx(atom.budget, rel=1e-5)
    dim = 1 if transposed else 0
    for (start, size) in ((0, 64), (64, 16), (80, 16)):  # each part: all singular values equal
        part = u.narrow(dim, start, size).double()
        s = torch.linalg.svdvals(part)
        assert float(s.max() / s.min()) == pytest.approx(1.0, rel=1e-5)
        # RMS→RMS norm of the part as a (size × 64) map is the budget
        assert math.sqrt(64 / size) * float(s.max()) == pytest.approx(atom.budget, rel=1e-5)
    path = ng.save(tmp_path / "gqa.json")
    assert normgraph.load(path).atoms["qkv"].options == atom.options


def test_hybrid_mode_reads_plain_sums_in_quadrature_and_weighted_sums_as_modula():
    """`x + W1 x` (a plain residual) has scale √2 in "hybrid" (2 in "scale"); `0.5·x + 0.5·W1 x`
    (explicit weights: a designed convex combination) has scale 1 and keeps modula's bonds."""
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1, self.w2 = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.w2(x + self.w1(x))

    class Weighted(Plain):
        def forward(self, x):
            return self.w2(0.5 * x + 0.5 * self.w1(x))

    x = (torch.randn(2, 8),)
    plain = normgraph.analyze(Plain(), x, sensitivity="hybrid").atoms
    assert plain["w2.weight"].downstream == pytest.approx(math.sqrt(2))
    assert plain["w1.weight"].downstream == pytest.approx(1.0)
    assert normgraph.analyze(Plain(), x, sensitivity="scale").atoms["w2.weight"].downstream == pytest.approx(2.0)
    for mode in ("hybrid", "scale", "modula"):
        weighted = normgraph.analyze(Weighted(), x, sensitivity=mode).atoms
        assert weighted["w2.weight"].downstream == pytest.approx(1.0), mode
        assert weighted["w1.weight"].downstream == pytest.approx(0.5), mode


# ---------------------------------------------------------------------------------------
# Residual body mass, gates, tied heads (hybrid mode)


@pytest.mark.parametrize("L", [1, 4])
def test_residual_body_shares_a_fixed_mass_so_outer_budgets_do_not_shrink_with_depth(L):
    """Every atom inside `x + f(x)` branches (w1, w2, the pre-norm gains) shares BODY_MASS;
    the embedding, the final norm and the head keep their kinds' masses, so their budgets
    are the same at every depth: head budget = 1 / (BODY_MASS + 1 + 1 + 0.1) / D(head) = 1."""
    from normgraph.analysis.options import BODY_MASS
    ng = normgraph.analyze(PreNorm(L), IDS)
    body = [a for n, a in ng.atoms.items() if n.startswith(("ln.", "w1.", "w2."))]
    assert len(body) == 3 * L
    assert sum(a.mass for a in body) == pytest.approx(BODY_MASS)
    assert [ng.atoms[n].mass for n in ("emb.weight", "ln_f.weight", "head.weight")] == pytest.approx([1, 0.1, 1])
    assert ng.atoms["head.weight"].budget == pytest.approx(1 / (BODY_MASS + 2.1))
    assert any("residual body" in note for note in ng.diagnostics.notes)


def test_body_mass_is_a_choice_and_weighted_residuals_have_no_body():
    per_atom = normgraph.analyze(PreNorm(3), IDS, body_mass=None)
    assert {a.mass for n, a in per_atom.atoms.items() if n.startswith("w")} == {1.0}
    four = normgraph.analyze(PreNorm(3), IDS, body_mass=4)
    assert sum(a.mass for n, a in four.atoms.items() if n.startswith(("ln.", "w1.", "w2."))) == pytest.approx(4)
    # masses= is applied afterwards and wins
    mixed = normgraph.analyze(PreNorm(3), IDS, masses={"w1": 6})
    assert sum(a.mass for n, a in mixed.atoms.items() if n.startswith("w1.")) == pytest.approx(6)
    with pytest.raises(ValueError, match="modula"):
        normgraph.analyze(PreNorm(1), IDS, sensitivity="modula", body_mass=4)
    with pytest.raises(ValueError, match="body_mass"):
        normgraph.analyze(PreNorm(1), IDS, body_mass=-1)
    # modula's convex residuals (explicitly weighted sums) are designed: masses as modula's
    convex = normgraph.analyze(ResidualMLP(3), (torch.randn(4, 8),))
    assert not any("residual body" in note for note in convex.diagnostics.notes)


class Gated(nn.Module):
    """out = W_d (act(W_g x) · W_u x) (SwiGLU's shape) or W_d (h · tanh h), h = W_g x (one activation)."""

    def __init__(self, gate: bool) -> None:
        super().__init__()
        self.gate = gate
        self.wg, self.wu, self.wd = (nn.Linear(8, 8, bias=False) for _ in range(3))

    def forward(self, x):
        h = self.wg(x)
        return self.wd(torch.tanh(h) * self.wu(x) if self.gate else h * torch.tanh(h))


def test_a_gate_counts_each_operand_half_an_elementwise_product_does_not():
    """A product of two maps' outputs is one bilinear unit (½ + ½, as attention's thirds); a
    product of two functions of one activation (GELU written out) keeps both full paths."""
    x = (torch.randn(2, 8),)
    gate = normgraph.analyze(Gated(True), x).atoms
    assert gate["wu.weight"].downstream == pytest.approx(0.5)
    assert gate["wg.weight"].downstream == pytest.approx(0.5)  # tanh: sensitivity 1, scale 1
    single = normgraph.analyze(Gated(False), x).atoms
    assert single["wg.weight"].downstream == pytest.approx(2.0)  # S(tanh h)·1 + S(h)·1
    assert normgraph.analyze(Gated(True), x, sensitivity="scale").atoms["wu.weight"].downstream == pytest.approx(1.0)


class TiedHead(nn.Module):
    def __init__(self, transposed: bool, vocab: int = 16, d: int = 8) -> None:
        super().__init__()
        self.transposed = transposed
        self.wte, self.ln = nn.Embedding(vocab, d), nn.LayerNorm(d, bias=False)

    def forward(self, ids):
        h = self.ln(self.wte(ids))
        return h @ self.wte.weight.T if self.transposed else F.linear(h, self.wte.weight)


@pytest.mark.parametrize("transposed", [False, True])
def test_tied_head_use_is_read_in_the_embedding_norm(transposed):
    """The table's step is sized per row (ℓ1→RMS); as the head, a row change of RMS 1 moves a
    logit by S(h)·√d for unaligned directions: D = 1 (embedding use) + √8 (head use)."""
    atoms = normgraph.analyze(TiedHead(transposed), IDS).atoms
    assert atoms["wte.weight"].kind == "embedding"
    assert atoms["wte.weight"].downstream == pytest.approx(1 + math.sqrt(8))
    scale = normgraph.analyze(TiedHead(transposed), IDS, sensitivity="scale").atoms
    assert scale["wte.weight"].downstream == pytest.approx(2.0)  # the other modes as they were


class Positions(nn.Module):
    """Token table read at the data's ids; a position table at arange(T) and one sliced `[:T]`;
    one plain residual block (or none)."""

    def __init__(self, residual: bool = True, d: int = 8) -> None:
        super().__init__()
        self.residual = residual
        self.tok, self.pos = nn.Embedding(16, d), nn.Embedding(8, d)
        self.pos2 = nn.Parameter(torch.randn(8, d))
        self.mid, self.head = nn.Linear(d, d, bias=False), nn.Linear(d, 16, bias=False)

    def forward(self, ids):
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t)) + self.pos2[:t]
        return self.head(x + self.mid(x) if self.residual else self.mid(x))


def test_tables_read_at_fixed_indices_take_the_position_table_mass_beside_a_residual_body():
    """With a residual body (fixed total mass) a position table takes POSITION_TABLE_MASS, not
    a token table's share; without one (every atom one unit) it keeps the embedding's mass."""
    assert normgraph.analyze(Positions(residual=False), IDS).atoms["pos.weight"].mass == 1.0
    atoms = normgraph.analyze(Positions(), IDS).atoms
    assert atoms["tok.weight"].mass == 1.0
    assert atoms["pos.weight"].kind == atoms["pos2"].kind == "embedding"
    assert atoms["pos.weight"].mass == atoms["pos2"].mass == pytest.approx(0.01)
    assert normgraph.analyze(Positions(), IDS, sensitivity="scale").atoms["pos.weight"].mass == 1.0
