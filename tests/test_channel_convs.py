"""Rule 10 of the default (docs/concepts.md §5): a conv whose output only a BatchNorm reads is
a `channel_conv`, moved per output channel (row-normalised), its budget shared over its K
kernel positions, without weight decay."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import normgraph
from normgraph.core.layout import atom_norm


class Block(nn.Module):
    """A ResNet basic block: x + bn2(conv2(relu(bn1(conv1(x)))))."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)    # reads the pixels: a stem
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.plain = nn.Conv2d(8, 8, 1, bias=True)                # read by a ReLU: stays a conv
        self.shared = nn.Conv2d(8, 8, 3, padding=1, bias=False)   # read by a BatchNorm and a sum
        self.bn_shared = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, img):
        h = self.blocks(torch.relu(self.bn(self.stem(img))))
        h = torch.relu(self.plain(h))
        s = self.shared(h)
        h = self.bn_shared(s) + s
        return self.head(h.mean((2, 3)))


def inputs() -> tuple[torch.Tensor]:
    return (torch.rand(4, 1, 6, 6),)


CHANNEL = ["blocks.0.conv1.weight", "blocks.0.conv2.weight", "blocks.1.conv1.weight", "blocks.1.conv2.weight"]


def test_convs_read_only_by_a_batch_norm_are_found_from_the_graph():
    torch.manual_seed(0)
    ng = normgraph.analyze(Net(), inputs())
    kinds = {n: a.kind for n, a in ng.atoms.items() if n.endswith("weight") and "bn" not in n}
    assert kinds == {"stem.weight": "stem", **{n: "channel_conv" for n in CHANNEL},
                     "plain.weight": "conv", "shared.weight": "conv", "head.weight": "linear"}
    for name in CHANNEL:
        atom = ng.atoms[name]
        assert (atom.dual, atom.options, atom.decay) == ("row_normalize", {}, 0.0)
    assert any(n.startswith("channel convs: 4 conv(s)") for n in ng.diagnostics.notes)
    assert "channel_conv 4" in str(ng).splitlines()[0]


def test_budget_is_the_convs_over_its_kernel_positions_and_decay_is_dropped():
    torch.manual_seed(0)
    model, x = Net(), inputs()
    # with a body decay set by hand (the default has none): a channel conv still does not decay
    on = normgraph.analyze(model, x, body_decay=0.05)
    off = normgraph.analyze(model, x, channel_convs=False, body_decay=0.05)
    for name in CHANNEL:
        assert off.atoms[name].kind == "conv" and off.atoms[name].decay == pytest.approx(0.05)
        # same mass and downstream; the 3×3 kernel's 9 positions share the budget
        assert on.atoms[name].mass == off.atoms[name].mass
        assert on.atoms[name].downstream == pytest.approx(off.atoms[name].downstream)
        assert on.atoms[name].budget == pytest.approx(off.atoms[name].budget / 9)
    for name in ("stem.weight", "plain.weight", "shared.weight", "head.weight", "bn.weight"):
        assert on.atoms[name].budget == pytest.approx(off.atoms[name].budget)
        assert on.atoms[name].decay == off.atoms[name].decay


def test_the_rule_is_off_in_modula_mode_under_kinds_and_with_channel_convs_false():
    torch.manual_seed(0)
    model, x = Net(), inputs()
    name = CHANNEL[0]
    assert normgraph.analyze(model, x, channel_convs=False).atoms[name].kind == "conv"
    assert normgraph.analyze(model, x, sensitivity="modula").atoms[name].kind == "conv"
    assert normgraph.analyze(model, x, kinds={name: "conv"}).atoms[name].kind == "conv"
    with pytest.raises(ValueError, match="channel_convs='yes'"):
        normgraph.analyze(model, x, channel_convs="yes")


def test_each_output_channel_moves_by_the_budget_in_rms():
    torch.manual_seed(0)
    model, x = Net(), inputs()
    opt = normgraph.compile(model, x, lr=0.5, momentum=0.0, nesterov=False, compile_mode="eager")
    name = CHANNEL[1]
    atom, w = opt.norm_graph.atoms[name], dict(model.named_parameters())[name]
    before = w.detach().clone()
    model(*x).square().mean().backward()
    opt.step()
    rows = (w.detach() - before).reshape(w.shape[0], -1)
    assert rows.pow(2).mean(1).sqrt() == pytest.approx([0.5 * atom.budget] * w.shape[0], rel=1e-5)
    # the step has the budget in the atom's own norm (the largest channel RMS)
    assert atom_norm(atom, w.detach() - before) == pytest.approx(0.5 * atom.budget, rel=1e-5)
    assert opt.group(name)["weight_decay"] == 0.0


def test_row_confidence_auto_leaves_channel_convs_alone_and_annotations_keep_them(tmp_path):
    torch.manual_seed(0)
    model, x = Net(), inputs()
    opt = normgraph.compile(model, x, compile_mode="eager")
    assert not any(opt.group(n)["row_confidence"] for n in CHANNEL)
    every = normgraph.compile(model, x, compile_mode="eager", row_confidence=True)
    assert all(every.group(n)["row_confidence"] for n in CHANNEL)
    path = tmp_path / "net.json"
    opt.norm_graph.save(path)
    loaded = normgraph.load(path)
    for name in CHANNEL:
        assert loaded.atoms[name].kind == "channel_conv"
        assert loaded.atoms[name].budget == pytest.approx(opt.norm_graph.atoms[name].budget)


def test_a_one_by_one_conv_read_by_a_batch_norm_stays_an_orthogonalised_conv():
    """A 1×1 conv is one matrix: orthogonalised, as a `conv` (on the zoo MobileNetV2's 1×1
    expansions and projections as channel convs cost 0.11 train loss, docs/concepts.md §5)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                          nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 4))
    atoms = normgraph.analyze(model, inputs()).atoms
    assert atoms["2.weight"].kind == "conv" and atoms["2.weight"].dual != "row_normalize"
    assert atoms["5.weight"].kind == "channel_conv"
