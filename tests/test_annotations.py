"""JSON annotations: exact round trip, hand-edited masses, field validation, check_against."""
from __future__ import annotations

import json
import warnings

import networkx as nx
import pytest
import torch

import normgraph
from normgraph.io import annotations
from normgraph.io.annotations import AnnotationError
from normgraph.core import Atom, Diagnostics, NormGraph


def hand_graph() -> NormGraph:
    """A NormGraph built by hand (independent of the analysis): fc1 → relu → fc2."""
    atoms = {
        "fc1.weight": Atom("fc1.weight", "linear", (4, 3), mass=1.0, downstream=2.0, fan_in=3, fan_out=4,
                           options={"pre_shape": [1, 4, 3], "perm": [0, 1, 2], "matrix": [1, 4, 3],
                                    "norm_scale": 1.0}, uses=["linear"]),
        "fc1.bias": Atom("fc1.bias", "bias", (4,), mass=0.5, downstream=2.0, uses=["linear"]),
        "fc2.weight": Atom("fc2.weight", "linear", (2, 4), mass=1.0, downstream=1.0, fan_in=4, fan_out=2,
                           uses=["linear_1"], note="output layer"),
    }
    total = sum(a.mass for a in atoms.values())
    g = nx.DiGraph()
    g.add_node("linear", type="op", op="linear", downstream=2.0, assumed=False)
    g.add_node("relu", type="op", op="relu", downstream=2.0, assumed=False)
    g.add_node("linear_1", type="op", op="linear", downstream=1.0, assumed=True)
    g.add_edge("linear", "relu", sensitivity=1.0)
    g.add_edge("relu", "linear_1", sensitivity=2.0)
    for a in atoms.values():
        a.budget = a.mass / total / a.downstream
        g.add_node(a.name, type="atom", kind=a.kind, norm=a.norm, shape=a.shape, mass=a.mass,
                   sensitivity=a.sensitivity, downstream=a.downstream, budget=a.budget)
        g.add_edge(a.name, a.uses[0])
    diag = Diagnostics(frontend="hand", trace_errors={"export": "no"}, assumed_ops={"relu": 1},
                       fallbacks={}, tied={"fc1.weight": ["linear", "linear_9"]},
                       unreached=[], notes=["made by hand"])
    return NormGraph(atoms, g, diag)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(3, 4)
        self.fc2 = torch.nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def same(a: NormGraph, b: NormGraph) -> bool:
    return (a.atoms == b.atoms and list(a.atoms) == list(b.atoms) and a.diagnostics == b.diagnostics
            and nx.utils.graphs_equal(a.graph, b.graph))


def edit(path, fn) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    fn(doc)
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


def test_round_trip_is_exact(tmp_path):
    ng = hand_graph()
    first = ng.save(tmp_path / "a.json")
    loaded = normgraph.load(first)
    second = loaded.save(tmp_path / "b.json")
    assert first.read_bytes() == second.read_bytes()
    assert same(ng, loaded)
    assert isinstance(loaded.atoms["fc1.weight"].shape, tuple)
    assert loaded.graph.nodes["fc1.weight"]["shape"] == (4, 3)


def test_round_trip_of_an_analysis(tmp_path):
    ng = normgraph.analyze(Net(), (torch.randn(2, 3),))
    ng.save(tmp_path / "a.json")
    loaded = normgraph.load(tmp_path / "a.json")
    loaded.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert same(ng, loaded)


def test_file_layout(tmp_path):
    doc = json.loads(hand_graph().save(tmp_path / "a.json").read_text(encoding="utf-8"))
    assert doc["schema"] == annotations.SCHEMA == "normgraph.annotations/1"
    assert doc["totals"] == {"total_mass": 2.5, "atoms": 3}
    first = doc["atoms"][0]
    for key in ("name", "shape", "dtype", "kind", "norm", "mass", "sensitivity", "downstream",
                "budget", "dual", "options", "fan_in", "fan_out"):
        assert key in first
    assert first["dual"] == "orthogonalize" and first["shape"] == [4, 3]
    assert doc["diagnostics"]["tied"] == {"fc1.weight": ["linear", "linear_9"]}
    text = (tmp_path / "a.json").read_text(encoding="utf-8")
    assert '"mass": 1.0,\n' in text  # one field per line: easy to hand-edit


def test_edited_mass_changes_budgets(tmp_path):
    path = hand_graph().save(tmp_path / "a.json")
    edit(path, lambda d: d["atoms"][2].update(mass=3.5))  # fc2.weight: 1 → 3.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an edited mass is not a mistake: no warning
        ng = normgraph.load(path)
    # by hand: total = 1 + 0.5 + 3.5 = 5; budget = mass / total / downstream
    assert ng.atoms["fc1.weight"].budget == pytest.approx(1 / 5 / 2)
    assert ng.atoms["fc1.bias"].budget == pytest.approx(0.5 / 5 / 2)
    assert ng.atoms["fc2.weight"].budget == pytest.approx(3.5 / 5 / 1)
    assert ng.atoms["fc2.weight"].downstream == 1.0  # downstream stays as analysed
    assert ng.graph.nodes["fc2.weight"]["budget"] == pytest.approx(0.7)
    assert ng.graph.nodes["fc2.weight"]["mass"] == 3.5
    again = normgraph.load(ng.save(tmp_path / "b.json"))
    assert again.atoms == ng.atoms


def test_edited_budget_is_recomputed_with_a_warning(tmp_path):
    path = hand_graph().save(tmp_path / "a.json")
    edit(path, lambda d: d["atoms"][0].update(budget=9.0))
    with pytest.warns(UserWarning, match="budget is derived from mass.*fc1.weight"):
        ng = normgraph.load(path)
    assert ng.atoms["fc1.weight"].budget == pytest.approx(1 / 2.5 / 2)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(schema="normgraph.annotations/0"), r"schema: expected 'normgraph\.annotations/1'"),
    (lambda d: d.pop("schema"), r"schema: expected"),
    (lambda d: d["atoms"][1].update(mass="heavy"), r"atoms\[1\] \('fc1\.bias'\)\.mass: expected a non-negative number"),
    (lambda d: d["atoms"][1].update(mass=-1), r"atoms\[1\] \('fc1\.bias'\)\.mass: expected a non-negative"),
    (lambda d: d["atoms"][0].update(shape=[4, "3"]), r"atoms\[0\] \('fc1\.weight'\)\.shape: expected a list"),
    (lambda d: d["atoms"][0].pop("downstream"), r"atoms\[0\] \('fc1\.weight'\)\.downstream: missing"),
    (lambda d: d["atoms"][0].update(mas=2), r"atoms\[0\] \('fc1\.weight'\)\.mas: unknown field"),
    (lambda d: d["atoms"][0].update(fan_in=2.5), r"\.fan_in: expected an integer or null"),
    (lambda d: d["atoms"][0].update(options=[]), r"\.options: expected an object"),
    (lambda d: d["atoms"].append(dict(d["atoms"][0])), r"atoms\[3\]\.name: duplicate parameter 'fc1\.weight'"),
    (lambda d: d["totals"].update(atoms=7), r"totals\.atoms: says 7 but the file lists 3"),
    (lambda d: d["diagnostics"].update(notes="x"), r"diagnostics\.notes: expected a list of strings"),
    (lambda d: d.update(extra=1), r"extra: unknown field"),
    (lambda d: [a.update(mass=0) for a in d["atoms"]], r"masses add up to 0"),
])
def test_bad_fields_are_named(tmp_path, change, message):
    path = hand_graph().save(tmp_path / "a.json")
    edit(path, change)
    with pytest.raises(AnnotationError, match=message) as info:
        normgraph.load(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_not_json(tmp_path):
    (tmp_path / "a.json").write_text("{ nope", encoding="utf-8")
    with pytest.raises(AnnotationError, match="not valid JSON"):
        normgraph.load(tmp_path / "a.json")


def test_check_against_accepts_the_model_it_describes():
    model = Net()
    annotations.check_against(normgraph.analyze(model, (torch.randn(2, 3),)), model)


def test_check_against_lists_every_mismatch():
    ng = hand_graph()  # fc1.weight (4,3), fc1.bias (4,), fc2.weight (2,4), all float32
    ng.atoms["gone.weight"] = Atom("gone.weight", "linear", (2, 2))
    model = torch.nn.Module()
    model.fc1 = torch.nn.Linear(3, 5)               # other shapes
    model.fc2 = torch.nn.Linear(4, 2, bias=False).double()  # other dtype
    model.new = torch.nn.Linear(2, 2, bias=False)   # missing from the annotations
    with pytest.raises(ValueError) as info:
        annotations.check_against(ng, model)
    text = str(info.value)
    assert "5 mismatches" in text
    assert "'fc1.weight': shape [4, 3] in the annotations, [5, 3] in the model" in text
    assert "'fc1.bias': shape [4] in the annotations, [5] in the model" in text
    assert "'fc2.weight': dtype float32 in the annotations, float64 in the model" in text
    assert "extra parameter 'gone.weight'" in text
    assert "missing parameter 'new.weight'" in text


def test_check_against_tied_and_frozen():
    model = torch.nn.Module()
    model.emb = torch.nn.Embedding(5, 3)
    model.head = torch.nn.Linear(3, 5, bias=False)
    model.head.weight = model.emb.weight
    model.frozen = torch.nn.Linear(3, 3)
    model.frozen.requires_grad_(False)
    # named by its alias, the tied parameter still matches; frozen ones need no atom
    ng = NormGraph({"head.weight": Atom("head.weight", "linear", (5, 3))})
    annotations.check_against(ng, model)
