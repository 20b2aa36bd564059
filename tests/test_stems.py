"""Rule 8 of the default (docs/concepts.md §5): a conv that reads the model's raw input is a
`stem`, moved entrywise (sign dual) with a gain's mass."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import normgraph
from normgraph.core.layout import atom_norm


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 4, bias=False))


@pytest.mark.parametrize("inputs", [None, (torch.randn(2, 1, 6, 6),)])
def test_a_cnn_stem_with_hand_derived_budgets(inputs):
    ng = normgraph.analyze(cnn(), inputs)
    assert [a.kind for a in ng.atoms.values()] == ["stem", "conv", "linear"]
    stem = ng.atoms["0.weight"]
    assert (stem.dual, stem.mass, stem.options) == ("sign", 0.1, {})
    # every downstream is 1, as without the rule; masses 0.1, 1, 1: budgets m / 2.1
    for name, mass in (("0.weight", 0.1), ("2.weight", 1.0), ("5.weight", 1.0)):
        assert ng.atoms[name].downstream == pytest.approx(1.0)
        assert ng.atoms[name].budget == pytest.approx(mass / 2.1)
    assert any("stem: 0.weight reads the model's raw input" in n for n in ng.diagnostics.notes)
    assert "stem 1" in str(ng).splitlines()[0]


def test_the_rule_is_off_with_stems_false_in_modula_mode_and_under_kinds():
    m, x = cnn(), (torch.randn(2, 1, 6, 6),)
    assert normgraph.analyze(m, x, stems=False).atoms["0.weight"].kind == "conv"
    assert normgraph.analyze(m, x, sensitivity="modula").atoms["0.weight"].kind == "conv"
    assert normgraph.analyze(m, x, kinds={"0.weight": "conv"}).atoms["0.weight"].kind == "conv"
    with pytest.raises(ValueError, match="stems='no'"):
        normgraph.analyze(m, x, stems="no")
    on = normgraph.analyze(m, x)
    assert on.atoms["2.weight"].budget == pytest.approx(1 / 2.1)  # the total mass is 2.1, not 3
    assert normgraph.analyze(m, x, stems=False).atoms["2.weight"].budget == pytest.approx(1 / 3)


class Stems(nn.Module):
    """Which weights read the raw input: after parameter-free ops yes, after a learned op no;
    a linear layer on raw features keeps its matrix norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 7, padding=3, bias=False)      # the image stem
        self.patch = nn.Conv2d(1, 8, 2, stride=2)                   # reads (img - 0.5) * 2: raw
        self.hidden = nn.Conv2d(8, 8, 3, padding=1, bias=False)     # reads the stem's output
        self.ln = nn.LayerNorm([1, 8, 8])                           # learned gain and bias
        self.after_ln = nn.Conv2d(1, 8, 3, padding=1, bias=False)   # reads a learned op: not raw
        self.feat = nn.Linear(5, 8)                                 # raw features: stays linear
        self.emb = nn.Embedding(10, 8)                              # integer ids: an embedding
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, img, feats, ids):
        h = self.hidden(F.relu(self.conv(img))).mean((2, 3)) + self.patch((img - 0.5) * 2).mean((2, 3))
        h = h + self.after_ln(self.ln(img)).mean((2, 3)) + self.feat(feats) + self.emb(ids).mean(1)
        return self.head(h)


def test_stems_are_found_from_the_graph():
    torch.manual_seed(0)
    model = Stems()
    args = (torch.rand(2, 1, 8, 8), torch.rand(2, 5), torch.randint(0, 10, (2, 3)))
    ng = normgraph.analyze(model, args)
    kinds = {n: a.kind for n, a in ng.atoms.items()}
    assert kinds == {"conv.weight": "stem", "patch.weight": "stem", "patch.bias": "bias", "hidden.weight": "conv",
                     "ln.weight": "gain", "ln.bias": "bias", "after_ln.weight": "conv", "feat.weight": "linear",
                     "feat.bias": "bias", "emb.weight": "embedding", "head.weight": "linear"}
    # per entry, not per kernel position: a stem's norm is its largest entry
    w = model.conv.weight
    assert atom_norm(ng.atoms["conv.weight"], w) == pytest.approx(w.abs().max().item())


def test_a_stem_step_moves_every_entry_by_lr_times_budget(tmp_path):
    torch.manual_seed(0)
    model = cnn()
    opt = normgraph.compile(model, (torch.randn(2, 1, 6, 6),), lr=0.1, momentum=0.0, nesterov=False,
                            weight_decay=0.0, compile_mode="eager")
    model(torch.randn(5, 1, 6, 6)).square().sum().backward()
    before = model[0].weight.detach().clone()
    grad = model[0].weight.grad.clone()
    opt.step()
    budget = opt.norm_graph.atoms["0.weight"].budget
    torch.testing.assert_close(before - model[0].weight.detach(), 0.1 * budget * grad.sign())
    # the annotations keep the kind and its entrywise (view-less) options
    ng = normgraph.load(opt.norm_graph.save(tmp_path / "cnn.json"))
    assert ng.atoms["0.weight"].kind == "stem" and ng.atoms["0.weight"].options == {}


def test_a_stem_survives_onnx_and_load_reads_an_onnx_path(tmp_path):
    model, x = cnn(), torch.randn(2, 1, 6, 6)
    path = normgraph.export_onnx(model, (x,), tmp_path / "cnn.onnx")
    ng = normgraph.load(path)  # a .onnx path goes to the ONNX reader
    assert ng.atoms["0.weight"].kind == "stem" and ng.atoms["2.weight"].kind == "conv"
    assert ng.atoms["0.weight"].budget == pytest.approx(0.1 / 2.1)
    binary = tmp_path / "cnn.bin"
    binary.write_bytes(path.read_bytes())
    with pytest.raises(normgraph.io.AnnotationError, match="binary content.*read_onnx_annotations"):
        normgraph.load(binary)
