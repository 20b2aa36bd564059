"""Acceptance tests of the norm inference (issue 2): budgets against hand-derived values."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import normgraph
from normgraph.core.layout import as_matrices, atom_norm


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 16, bias=False),
                         nn.ReLU(), nn.Linear(16, 4, bias=False))


@pytest.mark.parametrize("inputs", [None, (torch.randn(2, 8),)])
def test_three_layer_mlp_budgets_are_one_third(inputs):
    ng = normgraph.analyze(mlp(), inputs)
    assert [a.kind for a in ng.atoms.values()] == ["linear"] * 3
    for atom in ng.atoms.values():
        assert atom.budget == pytest.approx(1 / 3)
        assert atom.downstream == pytest.approx(1.0)
    assert ng.diagnostics.frontend == ("torch.export" if inputs else "torch.fx.symbolic_trace")


class ResidualMLP(nn.Module):
    def __init__(self, L: int, d: int = 16) -> None:
        super().__init__()
        self.L = L
        self.inp, self.out = nn.Linear(8, d, bias=False), nn.Linear(d, 4, bias=False)
        self.f1 = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(L))
        self.f2 = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(L))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for f1, f2 in zip(self.f1, self.f2):
            x = (1 - 1 / self.L) * x + (1 / self.L) * f2(torch.relu(f1(x)))
        return self.out(x)


@pytest.mark.parametrize("L", [1, 2, 4, 8])
@pytest.mark.parametrize("inputs", [False, True])
def test_residual_mlp_budgets(L, inputs):
    ng = normgraph.analyze(ResidualMLP(L), (torch.randn(2, 8),) if inputs else None)
    for name, atom in ng.atoms.items():
        expected = 1 / (2 * L + 2) if name in ("inp.weight", "out.weight") else L / (2 * L + 2)
        assert atom.budget == pytest.approx(expected), name


# --- A small GPT, and modula's algebra written out to derive its budgets by hand ------------

class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.fc, self.proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
        self.heads = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).view(B, T, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, d))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 16, L: int = 2, T: int = 8) -> None:
        super().__init__()
        self.emb = nn.ModuleDict({"tok": nn.Embedding(vocab, d), "pos": nn.Embedding(T, d)})
        self.blocks = nn.ModuleList(Block(d) for _ in range(L))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb["tok"](idx) + self.emb["pos"](torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class M:
    """A module of modula's algebra: mass, sensitivity, and how to hand a target norm down."""

    def __init__(self, mass: float, sens: float, split) -> None:
        self.mass, self.sens, self.split = mass, sens, split

    def targets(self, T: float) -> dict[str, float]:
        return self.split(T)


def atom(name: str, mass: float) -> M:
    return M(mass, 1.0, lambda T: {name: T})


def bond(sens: float) -> M:
    return M(0.0, sens, lambda T: {})


def compose(outer: M, inner: M) -> M:
    """outer ∘ inner: masses add, sensitivities multiply; inner's share is divided by outer.sens."""
    m = outer.mass + inner.mass

    def split(T: float) -> dict[str, float]:
        out = outer.targets(T * outer.mass / m) if outer.mass else {}
        if inner.mass:
            out.update(inner.targets(T * inner.mass / m / outer.sens))
        return out
    return M(m, outer.sens * inner.sens, split)


def chain(*ms: M) -> M:
    """ms[0] ∘ ms[1] ∘ …"""
    out = ms[-1]
    for m in reversed(ms[:-1]):
        out = compose(m, out)
    return out


def parallel(*ms: M) -> M:
    """Concatenation or sum of modules sharing an input: masses add, sensitivities add."""
    m = sum(x.mass for x in ms)

    def split(T: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for x in ms:
            if x.mass:
                out.update(x.targets(T * x.mass / m))
        return out
    return M(m, sum(x.sens for x in ms), split)


def test_tiny_gpt_budgets_match_modula_algebra():
    L, masses = 2, {"emb": 2.0, "blocks": 5.0, "head": 1.0}
    model = TinyGPT(L=L)
    ng = normgraph.analyze(model, (torch.randint(0, 32, (2, 8)),), masses=masses, sensitivity="modula")

    # Masses after tare: each key's total split in proportion to own masses (linear 1, gain 0.1);
    # ln_f's gain is under no key and keeps its default 0.1.
    per_block = 6 * 1.0 + 2 * 0.1
    mb = masses["blocks"] / (L * per_block)          # scale of the default masses in blocks
    lin, gain = mb * 1.0, mb * 0.1
    identity = bond(1.0)
    blocks = []
    for i in range(L):
        p = f"blocks.{i}."
        # attention branch: o ∘ SDPA ∘ (q, k, v) ∘ gain1 ∘ LN; SDPA has sensitivity 1 to its tuple
        attn = chain(atom(p + "o.weight", lin), bond(1.0),
                     parallel(atom(p + "q.weight", lin), atom(p + "k.weight", lin), atom(p + "v.weight", lin)),
                     atom(p + "ln1.weight", gain), bond(1.0))
        mlp_branch = chain(atom(p + "proj.weight", lin), bond(1.1289), atom(p + "fc.weight", lin),
                           atom(p + "ln2.weight", gain), bond(1.0))
        # residual: x + branch(x) is the sum of the identity and the branch
        blocks += [parallel(identity, attn), parallel(identity, mlp_branch)]  # in execution order
    embed = parallel(atom("emb.tok.weight", masses["emb"] / 2), atom("emb.pos.weight", masses["emb"] / 2))
    net = chain(atom("head.weight", masses["head"]), atom("ln_f.weight", 0.1), bond(1.0),
                *reversed(blocks), embed)
    expected = net.targets(1.0)

    assert set(expected) == set(ng.atoms)
    for name, atom_ in ng.atoms.items():
        assert atom_.budget == pytest.approx(expected[name], rel=1e-9), name
    assert ng.atoms["emb.tok.weight"].kind == "embedding"
    assert ng.atoms["blocks.0.ln1.weight"].kind == "gain"
    assert ng.total_mass == pytest.approx(2.0 + 5.0 + 1.0 + 0.1)


# --- Atom kinds, norms, diagnostics ---------------------------------------------------------

class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.conv = nn.Conv2d(4, 8, 3, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.ct = nn.ConvTranspose2d(8, 4, 2, groups=2)
        self.gain = nn.Parameter(torch.ones(16))
        self.stack = nn.Parameter(torch.randn(3, 16, 16))   # 3 matrices used by one batched matmul
        self.unused = nn.Parameter(torch.zeros(3))
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.register_buffer("scale", torch.ones(16))

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        y, _ = self.mha(x, x, x)
        y = self.frozen(y * self.gain * self.scale)
        y = torch.matmul(y.unsqueeze(1), self.stack).sum(1)
        z = self.ct(self.dw(self.conv(img)))
        return y.mean() + z.mean()


@pytest.fixture(scope="module")
def zoo_graph():
    torch.manual_seed(0)
    model = Zoo()
    return model, normgraph.analyze(model, (torch.randn(2, 5, 16), torch.randn(2, 4, 9, 9)), stems=False)


def test_zoo_kinds_and_exclusions(zoo_graph):
    model, ng = zoo_graph
    kinds = {n: a.kind for n, a in ng.atoms.items()}
    assert kinds == {
        "mha.in_proj_weight": "linear", "mha.in_proj_bias": "bias", "mha.out_proj.weight": "linear",
        "mha.out_proj.bias": "bias", "conv.weight": "conv", "conv.bias": "bias", "dw.weight": "conv",
        "dw.bias": "bias", "ct.weight": "conv", "ct.bias": "bias", "gain": "gain",
        "stack": "expert", "unused": "fallback"}
    assert "frozen.weight" not in ng.atoms and "scale" not in ng.atoms
    assert ng.atoms["mha.in_proj_weight"].options["matrix"] == [3, 16, 16]  # packed q, k, v
    assert ng.atoms["conv.weight"].options["matrix"] == [2 * 9, 4, 2]     # groups × positions
    assert ng.atoms["dw.weight"].options["matrix"] == [8 * 9, 1, 1]
    assert ng.atoms["ct.weight"].options["matrix"] == [2 * 4, 2, 4]
    assert "unused" in ng.diagnostics.unreached and "unused" not in ng.diagnostics.fallbacks
    assert ng.atoms["unused"].mass == 0.0 and ng.atoms["unused"].budget == 0.0


def _svd_norm_linear(w: torch.Tensor) -> float:
    return math.sqrt(w.shape[1] / w.shape[0]) * torch.linalg.matrix_norm(w.double(), ord=2).item()


def test_norms_against_svd_reference(zoo_graph):
    model, ng = zoo_graph
    w = model.mha.out_proj.weight
    assert atom_norm(ng.atoms["mha.out_proj.weight"], w) == pytest.approx(_svd_norm_linear(w))
    w = model.mha.in_proj_weight
    assert atom_norm(ng.atoms["mha.in_proj_weight"], w) == pytest.approx(
        max(_svd_norm_linear(c) for c in w.chunk(3, 0)))
    w = model.conv.weight  # (out=8, in/g=2, 3, 3), groups 2: K · max over groups and positions
    ref = 9 * max(_svd_norm_linear(w[g * 4:(g + 1) * 4, :, i, j]) for g in range(2) for i in range(3) for j in range(3))
    assert atom_norm(ng.atoms["conv.weight"], w) == pytest.approx(ref)
    w = model.ct.weight  # (in=8, out/g=2, 2, 2): group g maps in[g*4:(g+1)*4] -> 2 outputs
    ref = 4 * max(_svd_norm_linear(w[g * 4:(g + 1) * 4, :, i, j].T) for g in range(2) for i in range(2) for j in range(2))
    assert atom_norm(ng.atoms["ct.weight"], w) == pytest.approx(ref)
    w = model.stack  # used as x @ W: each (in, out) slice is one matrix
    assert atom_norm(ng.atoms["stack"], w) == pytest.approx(max(_svd_norm_linear(s.T) for s in w))
    assert atom_norm(ng.atoms["gain"], model.gain) == pytest.approx(1.0)
    emb = nn.Embedding(10, 4)
    ng2 = normgraph.analyze(emb, (torch.tensor([1, 2]),))
    assert atom_norm(ng2.atoms["weight"], emb.weight) == pytest.approx(emb.weight.pow(2).mean(1).sqrt().max().item())


def test_transposed_layout_matrix_view():
    class Conv1DLike(nn.Module):  # GPT-2's Conv1D: weight (in, out), y = x @ W + b
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 9))
            self.bias = nn.Parameter(torch.zeros(9))

        def forward(self, x):
            return torch.addmm(self.bias, x, self.weight).split(3, dim=-1)[0]

    m = Conv1DLike()
    ng = normgraph.analyze(m, (torch.randn(2, 6),))
    a = ng.atoms["weight"]
    assert (a.kind, a.fan_in, a.fan_out) == ("linear", 6, 3)
    mats = as_matrices(m.weight, a.options)
    assert torch.equal(mats[1], m.weight[:, 3:6].T)


@pytest.mark.parametrize("inputs", [None, (torch.randn(2, 4),)])
def test_transpose_attributes_are_transposes(inputs):
    """`x @ W.T` (numpy_T under torch.export, getattr under symbolic_trace), `.mT`, `.adjoint()`."""
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.randn(8, 4))
            self.b = nn.Parameter(torch.randn(3, 8))
            self.c = nn.Parameter(torch.randn(5, 3))

        def forward(self, x):
            return ((x @ self.a.T) @ self.b.mT) @ self.c.adjoint()

    m = M()
    ng = normgraph.analyze(m, inputs)
    for name, (fan_out, fan_in) in {"a": (8, 4), "b": (3, 8), "c": (5, 3)}.items():
        a = ng.atoms[name]
        assert (a.kind, a.fan_in, a.fan_out) == ("linear", fan_in, fan_out), a
        w = getattr(m, name)
        assert atom_norm(a, w) == pytest.approx(_svd_norm_linear(w))
    assert not ng.diagnostics.fallbacks and not ng.diagnostics.assumed_ops


def test_tied_parameter_takes_first_use_and_can_be_overridden():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.mid = nn.Linear(8, 8, bias=False)

        def forward(self, idx):
            return F.linear(self.mid(self.emb(idx)), self.emb.weight)

    m, idx = Tied(), (torch.randint(0, 20, (2, 3)),)
    ng = normgraph.analyze(m, idx)
    a = ng.atoms["emb.weight"]
    assert a.kind == "embedding" and "emb.weight" in ng.diagnostics.tied
    # D(embedding out) + D(head out) read in the table's row norm: 1 + √d (tests/test_scale.py)
    assert a.downstream == pytest.approx(1 + math.sqrt(8))
    assert normgraph.analyze(m, idx, sensitivity="modula").atoms["emb.weight"].downstream == pytest.approx(2.0)
    assert "tied parameter emb.weight" in str(ng)
    ng = normgraph.analyze(m, idx, kinds={"emb.weight": "linear"})
    assert (ng.atoms["emb.weight"].kind, ng.atoms["emb.weight"].fan_in) == ("linear", 8)
    with pytest.raises(ValueError, match="no use of emb.weight is a conv"):
        normgraph.analyze(m, idx, kinds={"emb.weight": "conv"})


def test_masses_prefixes_and_exact_names():
    ng = normgraph.analyze(ResidualMLP(2), masses={"f1": 4.0, "out.weight": 2.0})
    assert ng.atoms["f1.0.weight"].mass == pytest.approx(2.0)
    assert ng.atoms["out.weight"].mass == pytest.approx(2.0)
    assert ng.atoms["f2.0.weight"].mass == pytest.approx(1.0)
    assert ng.total_mass == pytest.approx(4 + 2 + 2 + 1)


def test_bond_rules_constants_and_activations():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)

        def forward(self, x):
            h = torch.sigmoid(self.a(x)) * 3.0
            return F.silu(self.b(h)) / 2.0

    ng = normgraph.analyze(Net(), (torch.randn(2, 4),), sensitivity="modula")
    assert ng.atoms["b.weight"].downstream == pytest.approx(1.0998 / 2)
    assert ng.atoms["a.weight"].downstream == pytest.approx(1.0998 / 2 * 3 * 0.25)
    # "scale" mode: b multiplies sigmoid(·)·3, whose scale is 3 (sigmoid's output is ≤ 1)
    ng = normgraph.analyze(Net(), (torch.randn(2, 4),))
    assert ng.atoms["b.weight"].downstream == pytest.approx(1.0998 / 2 * 3)
    assert ng.atoms["a.weight"].downstream == pytest.approx(1.0998 / 2 * 3 * 0.25)


@pytest.mark.parametrize("act, slope", [
    (F.selu, 1.0507009873554805 * 1.6732632423543772),  # λα, the slope just below 0
    (lambda x: F.elu(x, alpha=2.5), 2.5), (F.elu, 1.0), (F.celu, 1.0), (F.softplus, 1.0)])
def test_exponential_unit_slopes(act, slope):
    """Largest slope of each activation, checked numerically (autograd on a fine grid)."""
    grid = torch.linspace(-12, 12, 240001, dtype=torch.float64, requires_grad=True)
    act(grid).sum().backward()
    assert grid.grad.abs().max().item() == pytest.approx(slope, rel=1e-3)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return act(self.a(x))

    assert normgraph.analyze(Net(), (torch.randn(2, 4),)).atoms["a.weight"].downstream == pytest.approx(slope)


def test_custom_bond_rule_and_assumed_ops():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return torch.erf(self.a(x))

    ng = normgraph.analyze(Net(), (torch.randn(2, 4),))
    assert ng.diagnostics.assumed_ops == {"erf": 1}
    assert "assumed sensitivity 1 (no rule): erf×1" in str(ng)
    from normgraph.analysis.rules import BOND_RULES
    with BOND_RULES.scoped():
        normgraph.register_bond_rule("erf", 2 / math.sqrt(math.pi))
        ng = normgraph.analyze(Net(), (torch.randn(2, 4),))
        assert ng.diagnostics.assumed_ops == {}
        assert ng.atoms["a.weight"].downstream == pytest.approx(2 / math.sqrt(math.pi))
    assert "erf" not in BOND_RULES


def test_module_fallback_warns_and_still_gives_atoms():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.emb = nn.Embedding(5, 4)
            self.odd = nn.Parameter(torch.ones(2, 2))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: symbolic tracing cannot follow it
                return self.lin(x)
            return -self.lin(x)

    with pytest.warns(UserWarning, match="could not capture a graph.*pass example_inputs"):
        ng = normgraph.analyze(Untraceable())
    assert ng.diagnostics.frontend.startswith("modules")
    assert {n: a.kind for n, a in ng.atoms.items()} == {
        "lin.weight": "linear", "lin.bias": "bias", "emb.weight": "embedding", "odd": "fallback"}
    assert all(a.downstream == 1.0 for a in ng.atoms.values())
    assert "symbolic_trace" in ng.diagnostics.trace_errors


def test_bad_inputs_give_clear_errors():
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got int"):
        normgraph.analyze(3)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        normgraph.analyze(frozen)
    with pytest.raises(ValueError, match=r"Linear rejects the example inputs: RuntimeError: .*shapes"):
        normgraph.analyze(nn.Linear(3, 4), (torch.randn(2, 5),))
    with pytest.raises(ValueError, match="'blocks' match no trainable parameter"):
        normgraph.analyze(mlp(), masses={"blocks": 1.0})


def test_table_graph_and_dot():
    ng = normgraph.analyze(ResidualMLP(2), (torch.randn(2, 8),))
    text = str(ng)
    summary, blank, header = text.splitlines()[:3]
    assert summary.startswith("6 atoms (linear 6); budgets ") and "0 op(s) with assumed" in summary
    assert header.split() == ["parameter", "kind", "shape", "norm", "mass", "downstream", "budget", "decay"]
    assert "front end: torch.export" in text
    g = ng.graph
    assert g.nodes["f1.0.weight"]["type"] == "atom"
    assert g.nodes["f1.0.weight"]["budget"] == pytest.approx(2 / 6)
    ops = [d["op"] for _, d in g.nodes(data=True) if d["type"] == "op"]
    assert "linear" in ops and "relu" in ops
    assert any("sensitivity" in d for _, _, d in g.edges(data=True))
    dot = ng.to_dot()
    assert dot.startswith("digraph") and '"f1.0.weight"' in dot


def test_op_without_atom_rule_falls_back_visibly_and_a_registered_rule_fixes_it():
    class LogScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.log_scale = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return x * torch.exp(self.log_scale)

    ng = normgraph.analyze(LogScale(), (torch.randn(2, 4),))
    assert ng.atoms["log_scale"].kind == "fallback"
    assert "used by exp" in ng.diagnostics.fallbacks["log_scale"]
    assert "fallback norm for log_scale" in str(ng)
    from normgraph.analysis.rules import ATOM_RULES, AtomSpec
    with ATOM_RULES.scoped():
        normgraph.register_atom_rule("exp", lambda use: AtomSpec("gain", note="log-parameterised gain"))
        ng = normgraph.analyze(LogScale(), (torch.randn(2, 4),))
        assert ng.atoms["log_scale"].kind == "gain" and not ng.diagnostics.fallbacks
    assert "exp" not in ATOM_RULES


@pytest.mark.parametrize("op", ["cumsum", "diff"])
def test_cumsum_and_diff_sensitivities_from_shapes(op: str) -> None:
    """Shape known (torch.export): the RMS→RMS norm of the linear map along `dim` (n = 8),
    checked against the spectral norm of its matrix. Shape unknown: assumed, and said so."""
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 8)

        def forward(self, x):
            h = self.lin(x)
            return torch.cumsum(h, dim=1) if op == "cumsum" else torch.diff(h, dim=-1)

    eye = torch.eye(8, dtype=torch.float64)
    matrix = torch.tril(torch.ones(8, 8, dtype=torch.float64)) if op == "cumsum" else torch.diff(eye, dim=0)
    rms_to_rms = torch.linalg.matrix_norm(matrix, 2).item() * (matrix.shape[1] / matrix.shape[0]) ** 0.5
    ng = normgraph.analyze(M(), (torch.randn(3, 4),))
    assert ng.atoms["lin.weight"].downstream == pytest.approx(rms_to_rms, rel=1e-9)
    assert not ng.diagnostics.assumed_ops
    traced = normgraph.analyze(M())  # symbolic_trace: no shapes
    assert traced.diagnostics.assumed_ops == {op: 1} and traced.atoms["lin.weight"].downstream == 1.0


def test_opaque_torch_nn_activation_layers_get_their_functional_rules() -> None:
    """When torch.nn layers stay opaque (the third tracing strategy), nn.GELU/nn.Sigmoid are
    still gelu/sigmoid; LeakyReLU (slope set in its constructor) is reported as assumed."""
    from normgraph.analysis import ops, trace
    from normgraph.analysis.analyze import downstream

    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 2),
                          nn.LeakyReLU(2.0))
    cap = trace._symbolic(model, trace.trainable_names(model), keep_torch_leaves=True)
    names = [ops.op_name(n, cap.modules) for n in cap.graph.nodes if n.op == "call_module"]
    assert names == ["module:Linear", "gelu", "module:Linear", "sigmoid", "module:Linear", "module:LeakyReLU"]
    d, assumed = downstream(cap)
    by_target = {str(n.target): d[n] for n in cap.graph.nodes if n.op == "call_module"}
    assert by_target["0"] == pytest.approx(0.25 * 1.1289)  # Linear 0's output feeds GELU
    assert assumed == {"module:LeakyReLU": 1}


def test_register_kind_sets_dual_norm_and_mass() -> None:
    from normgraph.analysis.rules import ATOM_RULES, AtomSpec
    from normgraph.core import KINDS

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 8))
            self.lin = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.lin(x @ torch.exp(self.w).T)

    with pytest.raises(ValueError, match="unknown duality map 'warp'"):
        normgraph.register_kind("posexp", dual="warp", norm="?", mass=1.0)
    with ATOM_RULES.scoped(), KINDS.scoped():
        normgraph.register_atom_rule("exp", lambda use: AtomSpec("posexp", note="positive weights"))
        normgraph.register_kind("posexp", dual="sign", norm="ℓ∞ (of log-weights)", mass=3.0)
        ng = normgraph.analyze(Scaled(), (torch.randn(2, 8),))
        a = ng.atoms["w"]
        assert (a.kind, a.dual, a.norm, a.mass) == ("posexp", "sign", "ℓ∞ (of log-weights)", 3.0)
        assert ng.atoms["lin.weight"].mass == 1.0
        opt = normgraph.compile(Scaled(), (torch.randn(2, 8),), compile_mode="eager")
        assert "sign" in opt.source and "w" in opt.source
    assert "posexp" not in KINDS and "exp" not in ATOM_RULES
