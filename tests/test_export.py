"""Annotated ONNX export (conv net, tiny transformer), GraphML, node-link JSON, DOT, drawings."""
from __future__ import annotations

import json
import sys
import warnings

import networkx as nx
import onnx
import pytest
import torch
from onnx import helper

import normgraph
import shutil

from normgraph import api
from normgraph.io import graphs, onnx as export_onnx_io
from normgraph.io.annotations import AnnotationError
from normgraph.core import Atom, NormGraph

from test_annotations import hand_graph, same


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class TinyGPT(torch.nn.Module):
    """2-layer nn.TransformerEncoder with a tied head and a module the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight
        self.unused = torch.nn.Linear(2, 2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(idx)))


def export_and_read(model, inputs, path):
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ng = normgraph.analyze(model, inputs)
        api.export_onnx(model, inputs, path, norm_graph=ng)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    return ng, proto, normgraph.read_onnx_annotations(path)


def metadata(entries) -> dict[str, str]:
    return {e.key: e.value for e in entries}


@pytest.fixture(scope="module")
def conv_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "conv.onnx"
    return export_and_read(ConvNet(), (torch.randn(2, 3, 8, 8),), path)


@pytest.fixture(scope="module")
def gpt_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "gpt.onnx"
    return export_and_read(TinyGPT(), (torch.randint(0, 16, (2, 5)),), path)


def test_conv_net_round_trip(conv_export):
    ng, proto, back = conv_export
    assert proto.ir_version >= 10
    assert same(ng, back)
    inits = {i.name: metadata(i.metadata_props) for i in proto.graph.initializer}
    assert inits["conv.weight"]["normgraph.name"] == "conv.weight"
    assert inits["conv.weight"]["normgraph.kind"] == ng.atoms["conv.weight"].kind
    assert json.loads(inits["conv.weight"]["normgraph.shape"]) == [4, 3, 3, 3]
    assert json.loads(inits["fc.weight"]["normgraph.budget"]) == ng.atoms["fc.weight"].budget
    model_meta = metadata(proto.metadata_props)
    assert model_meta["normgraph.schema"] == "normgraph.annotations/1"
    assert json.loads(model_meta["normgraph.atoms"]) == len(ng.atoms)
    assert json.loads(model_meta["normgraph.total_mass"]) == ng.total_mass


def test_exporter_metadata_is_kept_and_nodes_get_a_summary(conv_export):
    _, proto, _ = conv_export
    node_keys = [metadata(n.metadata_props) for n in proto.graph.node]
    assert any(k.startswith("pkg.torch.onnx") for m in node_keys for k in m)  # the exporter's own
    conv = next(m for m in node_keys if "normgraph.conv.weight" in m)
    assert "budget" in conv["normgraph.conv.weight"]


def test_transformer_round_trip(gpt_export):
    ng, proto, back = gpt_export
    assert same(ng, back)
    by_torch_name = {metadata(i.metadata_props).get("normgraph.name"): i.name for i in proto.graph.initializer}
    # the exporter names the tied weight after one alias; the annotation carries the torch name
    assert by_torch_name["emb.weight"] in ("emb.weight", "head.weight")
    assert by_torch_name["enc.layers.1.linear2.weight"] == "enc.layers.1.linear2.weight"
    # a parameter with no initializer (never used by forward) is kept at model level
    assert "normgraph.atom:unused.weight" in metadata(proto.metadata_props)
    assert back.atoms["unused.weight"] == ng.atoms["unused.weight"]


def test_ir_version_is_raised_to_10():
    """TensorProto.metadata_props needs IR ≥ 10: an older model gets upgraded."""
    import onnx_ir as ir

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])],
        [helper.make_tensor("w", onnx.TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])])
    proto = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.from_proto(proto)
    holder = torch.nn.Module()
    holder.w = torch.nn.Parameter(torch.zeros(3))
    ng = NormGraph({"w": Atom("w", "bias", (3,), budget=1.0)})
    export_onnx_io.annotate_ir_model(model, ng, holder)
    out = ir.to_proto(model)
    assert out.ir_version == 10
    onnx.checker.check_model(out, full_check=True)
    assert metadata(out.graph.initializer[0].metadata_props)["normgraph.kind"] == "bias"


def test_read_onnx_without_annotations(tmp_path):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "plain.onnx")
    with pytest.raises(AnnotationError, match="no normgraph annotations"):
        normgraph.read_onnx_annotations(tmp_path / "plain.onnx")


def test_graphml(tmp_path):
    ng = hand_graph()
    graphs.write_graphml(ng, tmp_path / "g.graphml")
    back = nx.read_graphml(tmp_path / "g.graphml")
    assert set(back.nodes) == set(ng.graph.nodes) and set(back.edges) == set(ng.graph.edges)
    assert back.nodes["fc1.weight"]["shape"] == "[4, 3]"  # tuples become JSON strings
    assert back.nodes["fc1.weight"]["budget"] == ng.atoms["fc1.weight"].budget
    assert back.edges["relu", "linear_1"]["sensitivity"] == 2.0


def test_graphml_converts_none_and_lists(tmp_path):
    ng = hand_graph()
    ng.graph.nodes["relu"]["extra"] = None
    ng.graph.nodes["linear"]["args"] = [1, (2, 3)]
    graphs.write_graphml(ng, tmp_path / "g.graphml")
    back = nx.read_graphml(tmp_path / "g.graphml")
    assert back.nodes["relu"]["extra"] == "" and back.nodes["linear"]["args"] == "[1, [2, 3]]"


def test_node_link(tmp_path):
    ng = hand_graph()
    graphs.write_node_link(ng, tmp_path / "g.json")
    back = nx.node_link_graph(json.loads((tmp_path / "g.json").read_text()), edges="edges")
    assert set(back.edges) == set(ng.graph.edges)
    assert back.nodes["fc2.weight"]["kind"] == "linear"


def test_dot(tmp_path):
    ng = hand_graph()
    text = graphs.draw(ng, tmp_path / "g.dot").read_text()
    assert text.startswith("digraph normgraph {") and '"fc1.weight" -> "linear"' in text


@pytest.mark.parametrize("suffix, magic", [(".svg", b"<?xml"), (".png", b"\x89PNG")])
def test_draw_with_matplotlib(tmp_path, suffix, magic):
    path = graphs.draw(hand_graph(), tmp_path / f"g{suffix}", engine="matplotlib")
    assert path.read_bytes().startswith(magic)


def test_draw_through_normgraph_method(tmp_path):
    assert hand_graph().draw(tmp_path / "g.svg").stat().st_size > 0


@pytest.mark.skipif(not shutil.which("dot"), reason="Graphviz `dot` is not installed")
def test_draw_with_graphviz(tmp_path):
    path = graphs.draw(hand_graph(), tmp_path / "g.svg", engine="dot")
    assert b"<svg" in path.read_bytes()


def test_draw_without_any_renderer(tmp_path, monkeypatch):
    monkeypatch.setattr(graphs.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="neither Graphviz `dot` nor matplotlib"):
        graphs.draw(hand_graph(), tmp_path / "g.png")


def test_draw_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="use a .svg, .png, .pdf or .dot"):
        graphs.draw(hand_graph(), tmp_path / "g.txt")


def test_layers_put_atoms_before_their_ops():
    cols = graphs.layers(hand_graph().graph)
    assert cols["linear"] < cols["relu"] < cols["linear_1"]
    assert cols["fc1.weight"] == cols["linear"] - 1 and cols["fc2.weight"] == cols["linear_1"] - 1
