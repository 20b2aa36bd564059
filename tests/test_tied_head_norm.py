"""Rule 9 (docs/concepts.md §5): the gains and biases in front of a tied head take
`TIED_HEAD_NORM_MASS` beside a residual body."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import normgraph
from normgraph.analysis.options import TIED_HEAD_NORM_MASS

IDS = (torch.randint(0, 16, (2, 5)),)


class MaskedLM(nn.Module):
    """BERT's shape: a residual body, then a head transform (dense, GELU, LayerNorm) and a
    decoder tied to the token table, with its own bias."""

    def __init__(self, residual: bool = True, tied: bool = True, d: int = 8, vocab: int = 16) -> None:
        super().__init__()
        self.residual, self.tied = residual, tied
        self.tok = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d, bias=False)
        self.dense = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.decoder = nn.Linear(d, vocab, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)
        x = x + self.mid(x) if self.residual else self.mid(x)
        h = F.dropout(self.ln(F.gelu(self.dense(x))), 0.0, self.training)
        table = self.tok.weight if self.tied else self.decoder.weight
        return F.linear(h, table, self.bias)


class RMSNormTied(nn.Module):
    """A pre-norm stack with Llama's RMSNorm written out (`w * (x * rsqrt(mean(x²) + ε)).to(dtype)`)
    and a head tied to the token table as `h @ table.T`."""

    def __init__(self, d: int = 8, vocab: int = 16) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d, bias=False)
        self.norm = nn.Parameter(torch.ones(d))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)
        x = x + self.mid(x)
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return (self.norm * h.to(x.dtype)) @ self.tok.weight.T


def test_layernorm_in_front_of_a_tied_decoder_takes_the_tied_head_mass():
    ng = normgraph.analyze(MaskedLM(), IDS)
    atoms = ng.atoms
    assert TIED_HEAD_NORM_MASS == pytest.approx(0.3)
    assert atoms["tok.weight"].kind == "embedding"
    assert atoms["ln.weight"].kind == "gain" and atoms["ln.bias"].kind == "bias"
    assert atoms["ln.weight"].mass == atoms["ln.bias"].mass == pytest.approx(0.3)
    # the decoder's own bias and the head transform's bias are not in front of the table
    assert atoms["bias"].mass == atoms["dense.bias"].mass == pytest.approx(0.1)
    assert any("tied head" in n and "ln.weight" in n for n in ng.diagnostics.notes)
    # budget = mass / total mass / downstream, by hand from the atoms' own numbers
    total = sum(a.mass for a in atoms.values())
    for name in ("ln.weight", "ln.bias", "bias", "dense.weight"):
        a = atoms[name]
        assert a.budget == pytest.approx(a.mass / total / a.downstream * a.budget_scale)
    # three times the budget a gain's mass gives, at the same total mass
    assert atoms["ln.weight"].budget == pytest.approx(3 * 0.1 / total / atoms["ln.weight"].downstream)


def test_written_out_rmsnorm_gain_through_a_cast_is_found():
    atoms = normgraph.analyze(RMSNormTied(), IDS).atoms
    assert atoms["norm"].kind == "gain"
    assert atoms["norm"].mass == pytest.approx(TIED_HEAD_NORM_MASS)


@pytest.mark.parametrize("case", ["untied", "no body", "scale mode", "masses wins"])
def test_the_rule_stays_off_without_a_tied_head_or_a_body(case):
    model = MaskedLM(tied=case != "untied", residual=case != "no body")
    kwargs = {"scale mode": {"sensitivity": "scale"}, "masses wins": {"masses": {"ln": 0.05}}}.get(case, {})
    atoms = normgraph.analyze(model, IDS, **kwargs).atoms
    expected = 0.025 if case == "masses wins" else 0.1  # masses= splits 0.05 over the two atoms
    assert atoms["ln.weight"].mass == atoms["ln.bias"].mass == pytest.approx(expected)


def test_transformers_bert_head_norm_and_gpt2_final_norm_untied_llama_unchanged():
    T = pytest.importorskip("transformers")
    T.logging.set_verbosity_error()
    ids = (torch.randint(0, 64, (2, 8)),)
    bert = T.BertForMaskedLM(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=16))
    atoms = normgraph.analyze(bert, ids).atoms
    head = "cls.predictions.transform.LayerNorm"
    assert atoms[f"{head}.weight"].mass == atoms[f"{head}.bias"].mass == pytest.approx(TIED_HEAD_NORM_MASS)
    assert atoms["bert.embeddings.LayerNorm.weight"].mass == pytest.approx(0.1)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16))
    assert normgraph.analyze(gpt2, ids).atoms["transformer.ln_f.weight"].mass == pytest.approx(TIED_HEAD_NORM_MASS)
    llama = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=False))
    assert normgraph.analyze(llama, ids).atoms["model.norm.weight"].mass == pytest.approx(0.1)
