"""Patterns read by their math: the same network written differently gets the same budgets.

Each test builds one pre-norm residual network in two spellings that compute the same
function class (separate or fused q/k/v, SDPA or attention written out, full or partial
rotary, a table with or without a constant multiplier) and checks that the analysis gives
the corresponding atoms the same budgets (docs/concepts.md §5, "patterns").
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normgraph
from normgraph.core.layout import as_matrices, atom_parts

D, H, T, V, L = 32, 4, 8, 50, 2
HD = D // H
IDS = torch.randint(0, V, (2, T))


def heads(z: torch.Tensor) -> torch.Tensor:
    b, t, _ = z.shape
    return z.view(b, t, H, HD).transpose(1, 2)


def merge(y: torch.Tensor) -> torch.Tensor:
    b, _, t, _ = y.shape
    return y.transpose(1, 2).reshape(b, t, D)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """A rotary embedding on the last dim (cos/sin tables are constants)."""
    n = x.shape[-1]
    pos = torch.arange(x.shape[-2], dtype=torch.float32)[:, None]
    freq = pos / (10000 ** (torch.arange(0, n, 2, dtype=torch.float32) / n))
    cos, sin = torch.cat([freq.cos()] * 2, -1), torch.cat([freq.sin()] * 2, -1)
    x1, x2 = x[..., : n // 2], x[..., n // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, layout: str, written: bool | str = False, rotary: str = "none",
                 temperature: float | None = None) -> None:
        super().__init__()
        self.layout, self.written, self.rotary, self.temperature = layout, written, rotary, temperature
        if layout == "separate":
            self.q, self.k, self.v = (nn.Linear(D, D, bias=False) for _ in range(3))
        else:
            self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.o = nn.Linear(D, D, bias=False)

    def qkv_heads(self, x):
        b, t, _ = x.shape
        if self.layout == "separate":
            return heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if self.layout == "contiguous":
            return tuple(heads(z) for z in self.qkv(x).split(D, dim=-1))
        # interleaved per head, as GPT-NeoX and Bloom lay it out: (head, q/k/v, head_dim)
        return self.qkv(x).view(b, t, H, 3 * HD).transpose(1, 2).chunk(3, dim=-1)

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        if self.rotary == "full":
            q, k = rotate(q), rotate(k)
        elif self.rotary == "partial":  # rotate half the head dims, pass the rest, put back
            r = HD // 2
            q = torch.cat([rotate(q[..., :r]), q[..., r:]], -1)
            k = torch.cat([rotate(k[..., :r]), k[..., r:]], -1)
        scale = None if self.temperature is None else self.temperature / math.sqrt(HD)
        if self.written == "key":  # the scale folded into k before the product (DeBERTa)
            scores = q @ (k * (scale or 1 / math.sqrt(HD))).transpose(-1, -2)
            y = torch.softmax(scores, dim=-1) @ v
        elif self.written == "query-sdpa":  # q scaled before an SDPA told scale=1 (OPT, Whisper)
            y = F.scaled_dot_product_attention(q * (scale or 1 / math.sqrt(HD)), k, v, scale=1.0)
        elif self.written:
            scores = (q @ k.transpose(-1, -2)) * (scale or 1 / math.sqrt(HD))
            y = torch.softmax(scores, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return self.o(merge(y))


class Net(nn.Module):
    def __init__(self, layout: str = "separate", written: bool | str = False, rotary: str = "none",
                 multiplier: float | None = None, temperature: float | None = None, mlp: str = "gelu") -> None:
        super().__init__()
        self.multiplier, self.mlp = multiplier, mlp
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Attention(layout, written, rotary, temperature) for _ in range(L))
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(L))
        width = 8 * D if mlp == "swiglu-fused" else 4 * D  # fused: gate and up in one matrix (Phi-3)
        self.fc = nn.ModuleList(nn.Linear(D, width, bias=False) for _ in range(L))
        if mlp == "swiglu":
            self.up = nn.ModuleList(nn.Linear(D, 4 * D, bias=False) for _ in range(L))
        self.proj = nn.ModuleList(nn.Linear(4 * D, D, bias=False) for _ in range(L))
        self.norms2 = nn.ModuleList(nn.LayerNorm(D) for _ in range(L))
        self.final = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        if self.multiplier is not None:
            x = x * self.multiplier
        for i, (attn, n1, fc, proj, n2) in enumerate(zip(self.blocks, self.norms, self.fc, self.proj, self.norms2)):
            x = x + attn(n1(x))
            h = n2(x)
            if self.mlp == "swiglu":
                x = x + proj(F.silu(fc(h)) * self.up[i](h))
            elif self.mlp == "swiglu-fused":
                gate, up = fc(h).chunk(2, dim=-1)
                x = x + proj(F.silu(gate) * up)
            else:
                x = x + proj(F.gelu(fc(h)))
        return self.head(self.final(x))


def budgets(**kw) -> dict[str, float]:
    torch.manual_seed(0)
    return {n: a.budget for n, a in normgraph.analyze(Net(**kw), (IDS,)).atoms.items()}


def test_fused_qkv_weighs_as_three_separate_matrices():
    """Fusion invariance: a fused q/k/v matrix (either layout) moves each part as far as the
    separate q, k and v matrices move, and every other atom keeps its budget."""
    sep = budgets(layout="separate")
    for layout in ("contiguous", "interleaved"):
        fused = budgets(layout=layout)
        for i in range(L):
            for part in ("q", "k", "v"):
                assert fused[f"blocks.{i}.qkv.weight"] == pytest.approx(sep[f"blocks.{i}.{part}.weight"], rel=1e-9)
        others = [n for n in sep if ".q." not in n and ".k." not in n and ".v." not in n]
        for n in others:
            assert fused[n] == pytest.approx(sep[n], rel=1e-9), n


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
def test_fused_qkv_orthogonalizes_each_part(layout):
    """The dual sees three (D × D) matrices, and they are the rows of q, k and v."""
    torch.manual_seed(0)
    model = Net(layout=layout)
    atom = normgraph.analyze(model, (IDS,)).atoms["blocks.0.qkv.weight"]
    assert "3 parts" in atom.note
    w = model.blocks[0].qkv.weight.detach()
    mats = [as_matrices(w if sl is None else w.narrow(*sl), sub.options) for sl, sub in atom_parts(atom)]
    mats = torch.cat(mats)
    assert mats.shape == (3, D, D)
    if layout == "contiguous":
        expected = w.view(3, D, D)
    else:  # rows (head, part, head_dim): part p is rows h·3·HD + p·HD + j
        expected = w.view(H, 3, HD, D).transpose(0, 1).reshape(3, D, D)
    torch.testing.assert_close(mats, expected)


def test_fused_gate_and_up_read_as_a_gate():
    """`silu(x W_g) · x W_u` with W_g and W_u fused into one matrix and chunked (Phi-3,
    ModernBERT) is the same gated unit as with two matrices: the two pieces of one product
    are two maps. Every other atom keeps its budget, and the fused matrix moves as far as
    the separate gate and up (which the quadrature reads as one atom of twice the mass)."""
    sep, fused = budgets(mlp="swiglu"), budgets(mlp="swiglu-fused")
    for n in fused:
        if not n.startswith("fc."):
            assert fused[n] == pytest.approx(sep[n], rel=1e-9), n
    for i in range(L):
        parts = sorted((sep[f"fc.{i}.weight"], sep[f"up.{i}.weight"]))
        assert parts[0] * (1 - 1e-9) <= fused[f"fc.{i}.weight"] <= parts[1] * (1 + 1e-9)


def test_written_out_attention_reads_as_sdpa():
    """softmax(q·kᵀ/√d)·v written op by op gets the budgets of the same attention in one
    SDPA call: q, k and v a third each, q and k in relative terms."""
    sdpa, written = budgets(), budgets(written=True)
    for n in sdpa:
        assert written[n] == pytest.approx(sdpa[n], rel=1e-9), n


def test_logit_temperature_is_read_in_every_spelling():
    """Logits `c·q·kᵀ/√d` move c times as far under a relative change of q or k as the usual
    ones (T5 passes SDPA scale=1, DeBERTa divides k by √(3d)): the same budgets whether c is
    SDPA's `scale`, a factor on the scores, a factor on k, or a factor on q in front of an
    SDPA told scale=1 (OPT), the usual budgets at c = 1, and smaller q and k budgets at c > 1."""
    usual = budgets()
    assert budgets(temperature=1.0) == pytest.approx(usual, rel=1e-9)
    hot = budgets(temperature=4.0)
    for written in (True, "key", "query-sdpa"):
        other = budgets(temperature=4.0, written=written)
        for n in hot:
            assert other[n] == pytest.approx(hot[n], rel=1e-9), (written, n)
    for written in ("key", "query-sdpa"):
        assert budgets(temperature=1.0, written=written) == pytest.approx(usual, rel=1e-9), written
    for part in ("q", "k"):
        assert hot[f"blocks.0.{part}.weight"] < usual[f"blocks.0.{part}.weight"]


def test_partial_rotary_reads_as_a_rotation():
    """Rotating half of q and k and concatenating the pass-through half back is a rotation:
    the same budgets as full rotary and as no rotary (SDPA reads q and k relative)."""
    none, full, partial = budgets(), budgets(rotary="full"), budgets(rotary="partial")
    for n in none:
        assert full[n] == pytest.approx(none[n], rel=1e-9), n
        assert partial[n] == pytest.approx(none[n], rel=1e-9), n


def test_table_multiplier_is_part_of_the_table():
    """`emb(ids) · √d` (Gemma, BioGPT, Pegasus): the body reads as the unscaled model's, and
    the table's own downstream carries the multiplier, so its rows × √d move as an unscaled
    table's rows do."""
    c = math.sqrt(D)
    plain, scaled = budgets(), budgets(multiplier=c)
    for n in plain:
        if n == "emb.weight":
            assert scaled[n] * c == pytest.approx(plain[n], rel=1e-9)
        else:
            assert scaled[n] == pytest.approx(plain[n], rel=1e-9), n


def test_partial_rotary_of_a_separate_q_is_not_a_fused_projection():
    """Slicing q for partial rotary and putting it back is one part, not two."""
    torch.manual_seed(0)
    ng = normgraph.analyze(Net(rotary="partial"), (IDS,))
    assert "parts" not in ng.atoms["blocks.0.q.weight"].note
    assert ng.atoms["blocks.0.q.weight"].mass == ng.atoms["blocks.0.o.weight"].mass


class EncoderDecoder(nn.Module):
    """One table read by an encoder and a decoder; each decoder block cross-attends to the
    encoder's output (T5, BART)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.enc = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(L))
        self.enc_norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(L))
        self.cross = nn.ModuleList(Attention("separate") for _ in range(L))
        self.dec_norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(L))
        self.final = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids):
        e = self.emb(ids)
        for f, n in zip(self.enc, self.enc_norms):
            e = e + f(n(e))
        y = self.emb(ids.flip(-1))
        for attn, n in zip(self.cross, self.dec_norms):
            q = heads(attn.q(n(y)))
            k, v = heads(attn.k(e)), heads(attn.v(e))
            y = y + attn.o(merge(F.scaled_dot_product_attention(q, k, v)))
        return self.head(self.final(y))


def test_an_encoders_embedding_read_through_cross_attention_stays_an_embedding():
    """The decoder's cross-attention reads the encoder's output, and through it the encoder's
    embedding; that table is upstream of the encoder's own joins, so it is no part of the
    decoder's branches: it keeps an embedding's mass, as in a decoder-only network, while
    the cross-attention's k and v projections (on the encoder's output) are body matrices."""
    torch.manual_seed(0)
    atoms = normgraph.analyze(EncoderDecoder(), (IDS,)).atoms
    torch.manual_seed(0)
    alone = normgraph.analyze(Net(), (IDS,)).atoms
    assert atoms["emb.weight"].mass == pytest.approx(alone["emb.weight"].mass, rel=1e-9)
    for name in ("cross.0.k.weight", "cross.0.v.weight", "enc.0.weight"):
        assert atoms[name].mass == pytest.approx(atoms["cross.0.q.weight"].mass, rel=1e-9), name
    assert atoms["cross.0.q.weight"].mass < atoms["emb.weight"].mass


def test_without_a_body_a_fused_projection_keeps_its_mass_and_is_orthogonalized_per_part():
    """Modula's explicitly weighted residuals (the demo GPT) keep the masses they were written
    with: its fused q/k/v weighs one matrix, as before, and each part is still orthogonalized
    on its own (weighing it as three cost the demo 0.115 of train loss, concepts.md §5)."""
    from normgraph.demo.models import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(d_model=32, n_layer=2, n_head=4, block_size=16))
    atoms = normgraph.analyze(model, (torch.randint(0, 256, (2, 16)),)).atoms
    qkv = atoms["blocks.0.attn.qkv.weight"]
    assert qkv.mass == atoms["blocks.0.attn.proj.weight"].mass
    assert "3 parts" in qkv.note and "weighs" not in qkv.note
    w = model.blocks[0].attn.qkv.weight.detach()
    mats = torch.cat([as_matrices(w if sl is None else w.narrow(*sl), sub.options) for sl, sub in atom_parts(qkv)])
    assert mats.shape == (3, 32, 32)


class ParallelNet(nn.Module):
    """GPT-J/Phi blocks: `x + attn(n(x)) + mlp(n(x))`, one norm read by both branches, or
    NeoX's two norms (`shared=False`)."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.shared = shared
        self.emb = nn.Embedding(V, D)
        self.attn = nn.ModuleList(Attention("separate") for _ in range(L))
        self.n1 = nn.ModuleList(nn.LayerNorm(D) for _ in range(L))
        self.n2 = nn.ModuleList(nn.LayerNorm(D) for _ in range(L))
        self.fc = nn.ModuleList(nn.Linear(D, 4 * D, bias=False) for _ in range(L))
        self.proj = nn.ModuleList(nn.Linear(4 * D, D, bias=False) for _ in range(L))
        self.final = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        for i in range(L):
            a = self.n1[i](x)
            m = a if self.shared else self.n2[i](x)
            x = x + self.attn[i](a) + self.proj[i](F.gelu(self.fc[i](m)))
        return self.head(self.final(x))


def test_an_activation_read_in_two_branches_sums_them_in_quadrature():
    """A parallel block's one norm read by the attention and the MLP branch: within a branch
    its uses add up (q, k and v of one input), across branches they add in quadrature, as a
    stream read by its next block does (`branch_fanout`). The norm's gain then has downstream
    √(A² + B²), A and B the two branches' sums, and the table below it gets the budget it gets
    with a norm for each branch (NeoX's layout), which the old sum did not give it."""
    def run(shared: bool, **kw):
        torch.manual_seed(0)
        return normgraph.analyze(ParallelNet(shared), (IDS,), **kw).atoms
    for fanout in (True, False):
        atoms = run(True, branch_fanout=fanout)
        for i in range(L):
            a = sum(atoms[f"attn.{i}.{p}.weight"].downstream for p in "qkv")
            b = atoms[f"fc.{i}.weight"].downstream
            want = math.hypot(a, b) if fanout else a + b
            assert atoms[f"n1.{i}.weight"].downstream == pytest.approx(want, rel=1e-9)
    two = run(False)
    assert run(True)["emb.weight"].budget == pytest.approx(two["emb.weight"].budget, rel=1e-9)
    assert run(True, branch_fanout=False)["emb.weight"].budget < 0.7 * two["emb.weight"].budget


class RelativeNet(nn.Module):
    """Pre-norm attention blocks whose scores get a relative-position term: T5's and MPNet's
    bias table (an `nn.Embedding` of buckets × heads, read at constant buckets and added to
    the scores), or DeBERTa's raw table read whole and projected (`raw=True`). The token rows
    also get BERT's `tok + pos`."""

    def __init__(self, raw: bool) -> None:
        super().__init__()
        self.raw = raw
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        if raw:
            self.rel = nn.Parameter(torch.randn(2 * T, D) * 0.02)
            self.rel_k = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(L))
        else:
            self.rel = nn.Embedding(2 * T, H)
        self.register_buffer("buckets", torch.arange(T)[None, :] - torch.arange(T)[:, None] + T)
        self.q, self.k, self.v, self.o = (nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(L))
                                          for _ in range(4))
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(L))
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        bias = None if self.raw else self.rel(self.buckets).permute(2, 0, 1)  # once, as T5 and MPNet do
        for i in range(L):
            h = self.norms[i](x)
            q, k, v = heads(self.q[i](h)), heads(self.k[i](h)), heads(self.v[i](h))
            scores = q @ k.transpose(-1, -2) / math.sqrt(HD)
            if self.raw:  # q · (projected relative rows), gathered per (i, j)
                rel = self.rel_k[i](self.rel).view(2 * T, H, HD).transpose(0, 1)  # H, 2T, HD
                c2p = q @ rel.transpose(-1, -2) / math.sqrt(HD)  # B, H, T, 2T
                scores = scores + c2p.gather(-1, self.buckets.expand(*c2p.shape[:2], T, T))
            else:
                scores = scores + bias
            x = x + self.o[i](merge(scores.softmax(-1) @ v))
        return self.head(x)


@pytest.mark.parametrize("raw", [False, True])
def test_a_position_term_of_attention_keeps_a_tables_mass(raw):
    """Rule 4 gives a table read at no token a small mass because its rows are added to the
    token rows (`tok + pos`) and must not outgrow them. A relative-position term read by
    attention is not added to the token rows: a bias table keeps its embedding's mass, and a
    raw table the rules do not know (a fallback) reads as a table (mass 1), not a bias (0.1).
    `pos` still takes the position-table mass."""
    torch.manual_seed(0)
    ng = normgraph.analyze(RelativeNet(raw), (IDS,))
    atoms = ng.atoms
    assert atoms["pos.weight"].mass == pytest.approx(0.01)
    rel = atoms["rel" if raw else "rel.weight"]
    assert rel.kind == ("fallback" if raw else "embedding")
    assert rel.mass == pytest.approx(1.0)
    assert "position term of attention" in rel.note
    assert any(n.startswith("position term: rel") for n in ng.diagnostics.notes)
    # the other modes keep their masses: the step is the default's
    assert normgraph.analyze(RelativeNet(raw), (IDS,), sensitivity="scale").atoms[
        "rel" if raw else "rel.weight"].mass == pytest.approx(1.0 if not raw else 0.1)


def test_position_terms_false_gives_every_table_read_at_no_token_the_small_mass():
    torch.manual_seed(0)
    atoms = normgraph.analyze(RelativeNet(False), (IDS,), position_terms=False).atoms
    assert atoms["rel.weight"].mass == pytest.approx(0.01)
    torch.manual_seed(0)
    raw = normgraph.analyze(RelativeNet(True), (IDS,), position_terms=False).atoms
    assert raw["rel"].kind == "fallback" and raw["rel"].mass == pytest.approx(0.1)  # a bias's, as before
