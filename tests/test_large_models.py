"""Big models without weights: analysis on the meta device, configs from the command line,
and an analysis whose work grows linearly with depth."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn

import normgraph
from normgraph import cli, hf
from normgraph.analysis import residual
from normgraph.analysis.analyze import _live
from normgraph.analysis.default import _plain_join
from normgraph.analysis.scale import Scales, is_integer
from normgraph.analysis.trace import capture

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=256)
CONFIGS = {
    "llama": dict(SMALL, num_key_value_heads=2),
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, vocab_size=256, n_positions=64),
    "gemma": dict(SMALL, num_key_value_heads=2, head_dim=16),
    "bert": SMALL,
}


def same_budgets(a: normgraph.NormGraph, b: normgraph.NormGraph) -> None:
    assert list(a.atoms) == list(b.atoms)
    for name in a.atoms:
        x, y = a.atoms[name], b.atoms[name]
        assert (x.kind, x.shape, x.mass, x.decay) == (y.kind, y.shape, y.mass, y.decay), name
        assert y.budget == pytest.approx(x.budget, rel=1e-12, abs=0), name


def real_and_meta(kind: str) -> tuple[nn.Module, nn.Module]:
    cfg = hf.load_config(model_type=kind, overrides=CONFIGS[kind])
    torch.manual_seed(0)
    cls = hf.auto_class(cfg)
    real = cls.from_config(cfg).eval()
    with torch.device("meta"):
        meta = cls.from_config(cfg).eval()
    return real, meta


FUSED = {  # fused q/k/v in other layouts, read as parts (patterns.output_parts): per head, multi-query
    "gpt_neox": SMALL,
    "falcon": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=256),
    "bloom": dict(hidden_size=64, n_layer=3, n_head=4, vocab_size=256),
}
CONFIGS.update(FUSED)


@pytest.mark.parametrize("kind", ["llama", "gpt2", *FUSED])
def test_a_meta_model_gets_the_budgets_of_the_same_model_with_weights(kind: str) -> None:
    real, meta = real_and_meta(kind)
    ids = torch.randint(0, 256, (1, 16))
    ng = normgraph.analyze(real, (ids,))
    on_meta = normgraph.analyze(meta, (ids.to("meta"),))
    same_budgets(ng, on_meta)
    same_budgets(ng, normgraph.analyze(meta, (ids,)))  # CPU inputs are moved to meta
    assert any("meta device" in n for n in on_meta.diagnostics.notes)


@pytest.mark.parametrize("kind", ["bert", "gemma", "gpt2", "llama"])
def test_the_weightless_builder_reads_the_constants_a_model_computes(kind: str) -> None:
    """Gemma multiplies its embedding by a stored √d: built fully on meta that constant is
    unknown (and said so); `hf.weightless_model` computes it, and the budgets are the real ones."""
    real, meta = real_and_meta(kind)
    built = hf.weightless_model(hf.load_config(model_type=kind, overrides=CONFIGS[kind]))
    assert all(p.is_meta for p in built.parameters())
    args, kwargs = hf.example_inputs(built)
    ng = normgraph.analyze(real, tuple(torch.zeros(a.shape, dtype=a.dtype) for a in args))
    same_budgets(ng, normgraph.analyze(built, args, kwargs))
    if kind == "gemma":
        blind = normgraph.analyze(meta, args)
        assert any("no values (meta device)" in n and "embed_scale" in n for n in blind.diagnostics.notes)
        # the multiplier belongs to the table (docs/concepts.md §5): read as 1, the table's own
        # downstream misses its √d, while the body does not depend on it either way
        e, q = "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"
        assert blind.atoms[e].budget != pytest.approx(ng.atoms[e].budget, rel=0.1)
        assert blind.atoms[q].budget == pytest.approx(ng.atoms[q].budget, rel=1e-9)


class Residual(nn.Module):
    def __init__(self, d: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
                                    for _ in range(depth))
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def test_a_meta_model_without_example_inputs_and_its_saved_annotations(tmp_path: Path) -> None:
    torch.manual_seed(0)
    real = Residual()
    with torch.device("meta"):
        meta = Residual()
    ng = normgraph.analyze(meta)  # symbolic tracing: no inputs at all
    assert ng.diagnostics.frontend.startswith("torch.fx.symbolic_trace")
    same_budgets(normgraph.analyze(real), ng)
    path = tmp_path / "meta.normgraph.json"
    ng.save(path)
    back = normgraph.load(path)
    same_budgets(ng, back)
    # compile keeps its clear error on the meta model, and works after to_empty with the annotations
    with pytest.raises(ValueError, match="meta device.*to_empty.*annotations"):
        normgraph.compile(meta, annotations=back, compile_mode="eager")
    with pytest.raises(ValueError, match="meta device"):
        normgraph.NormGraphOptimizer(meta, back)
    model = meta.to_empty(device="cpu")
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    opt = normgraph.compile(model, annotations=back, compile_mode="eager")
    x = torch.randn(5, 8)
    model(x).square().mean().backward()
    before = model.out.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.out.weight)


@pytest.mark.parametrize("shape", ["7b", "70b"])
def test_llama_7b_and_70b_shapes_analyse_on_meta(shape: str, tmp_path: Path) -> None:
    big = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
           "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8)}[shape]
    model = hf.weightless_model(hf.load_config(model_type="llama", overrides={**big, "vocab_size": 32000}))
    args, kwargs = hf.example_inputs(model)
    ng = normgraph.analyze(model, args, kwargs)
    names = [n for n, p in model.named_parameters()]
    assert list(ng.atoms) == names and not ng.diagnostics.fallbacks and not ng.diagnostics.unreached
    layers = big["num_hidden_layers"]
    assert len(ng.atoms) == 9 * layers + 3
    matrices = [a.budget for a in ng.atoms.values() if a.dual in ("orthogonalize", "row_normalize")]
    assert max(matrices) / min(matrices) < 100
    path = tmp_path / f"llama{shape}.json"
    ng.save(path)
    same_budgets(ng, normgraph.load(path))
    assert json.loads(path.read_text())["atoms"][0]["name"] == "model.embed_tokens.weight"


# ---------------------------------------------------------------------------------------------
# The command line


def test_inspect_and_export_a_config_without_weights(tmp_path: Path, capsys) -> None:
    small = ["--set", "num_hidden_layers=2", "--set", "hidden_size=64", "--set", "intermediate_size=128",
             "--set", "num_attention_heads=4", "--set", "vocab_size=256"]
    assert cli.main(["inspect", "--model-type", "llama", *small]) == 0
    out = capsys.readouterr().out
    assert "lm_head.weight" in out and "parameters on the meta device" in out
    cfg = hf.load_config(model_type="llama", overrides=hf.parse_overrides([s for s in small if s != "--set"]))
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    target = tmp_path / "llama.json"
    assert cli.main(["export", "--config", str(tmp_path / "config.json"), "-o", str(target)]) == 0
    ng = normgraph.load(target)
    torch.manual_seed(0)
    real = transformers.LlamaForCausalLM(cfg)
    same_budgets(normgraph.analyze(real, (torch.zeros(1, 16, dtype=torch.long),)), ng)
    assert cli.main(["export", "--config", str(tmp_path), "--input-shape", "2,8", "-o", str(tmp_path / "g.dot")]) == 0


@pytest.mark.parametrize("argv, fragment", [
    (["inspect", "--model-type", "no-such-model"], "unknown model type 'no-such-model'"),
    (["inspect", "--model-type", "llama", "--set", "num_layerz=2"], "no setting(s) ['num_layerz']"),
    (["inspect", "--model-type", "llama", "--set", "oops"], "expected KEY=VALUE"),
    (["inspect", "--config", "/no/such/dir"], "no config file"),
    (["inspect", "--model-type", "gpt2", "--task", "image-classification"], "has no image-classification model"),
])
def test_config_errors_are_one_line(argv, fragment, capsys) -> None:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, fragment", [
    (["inspect"], "MODEL (or a transformers config"),
    (["export", "x.py", "--model-type", "llama", "-o", "x.json"], "not both"),
])
def test_model_or_config_is_a_usage_error(argv, fragment, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and fragment in capsys.readouterr().err


def test_onnx_needs_weights_and_transformers_is_named_when_missing(tmp_path: Path, monkeypatch, capsys) -> None:
    small = ["--set", "num_hidden_layers=1", "--set", "hidden_size=32", "--set", "intermediate_size=64",
             "--set", "num_attention_heads=2", "--set", "vocab_size=64"]
    assert cli.main(["export", "--model-type", "llama", *small, "-o", str(tmp_path / "m.onnx")]) == 1
    assert "needs weights" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert cli.main(["inspect", "--model-type", "llama"]) == 1
    assert "needs transformers" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Linear work in the depth: the residual walk on bitsets gives the set-based walk's answer


def _reference_residuals(graph, live, is_join, signal) -> residual.Residuals:
    """The walk as it was written with sets of nodes (quadratic in the depth)."""
    def carries(n):
        return n in live and signal(n)
    ancestors, after_join, before_join, branch = {}, set(), set(), {}
    from normgraph.analysis import ops
    for node in graph.nodes:
        inputs = [i for i in node.all_input_nodes if i in ancestors]
        reach_of = [ancestors[i] | {i} if carries(i) else ancestors[i] for i in inputs]
        ancestors[node] = frozenset().union(*reach_of) if reach_of else frozenset()
        if any(i in after_join for i in inputs):
            after_join.add(node)
        if not carries(node) or not is_join(node):
            continue
        terms = list(dict.fromkeys(i for _, i in ops.tensor_inputs(node) if carries(i)))
        if len(terms) < 2:
            continue
        reach = [ancestors[t] | {t} for t in terms]
        shared = frozenset.intersection(*reach)
        if not shared:
            continue
        for term, r in zip(terms, reach):
            for n in r - shared:
                branch.setdefault(n, term)
        before_join |= ancestors[node]
        after_join.add(node)
    return residual.Residuals(branch, frozenset((after_join & before_join) - set(branch)))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_the_bitset_residual_walk_equals_the_set_walk(kind: str) -> None:
    real, _ = real_and_meta(kind)
    cap = capture(real, (torch.zeros(1, 8, dtype=torch.long),), {})
    trainable = {n: p for n, p in real.named_parameters()}
    live = _live(cap)
    scales = Scales(cap.graph, live, cap.params, set(), cap.modules)
    for join in (_plain_join(cap, scales), lambda n: True):
        args = (cap.graph, live, join, lambda n: n not in scales.weights and not is_integer(n))
        got, want = residual.residuals(*args), _reference_residuals(*args)
        assert got.branch == want.branch and got.between == want.between
    assert trainable


def test_gate_roots_are_the_nearest_weighted_ops() -> None:
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wa, self.wb = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            h = x + x @ self.wa  # a residual stream
            return torch.relu(h @ self.wa) * (h @ self.wb)  # a gate: two maps of h

    gm = fx.symbolic_trace(Gated())
    params = {n: str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    live = set(gm.graph.nodes)
    scales = Scales(gm.graph, live, params, set(), dict(gm.named_modules()))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    relu, right = out.args
    stream = relu.args[0].args[0]
    assert scales.roots(relu) == frozenset([relu.args[0]]) and scales.roots(right) == frozenset([right])
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert scales.roots(stream) == frozenset([x, stream.args[1]])  # the input and the first map
    assert scales.gating(out) and not scales.gating(stream.args[1])
