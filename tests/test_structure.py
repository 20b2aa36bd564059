"""The package's structure: no import cycles, passes that import only what is below them,
registries as the one way to extend normgraph, and the functional optimizer core."""
from __future__ import annotations

import ast
import io
from pathlib import Path

import networkx as nx
import pytest
import torch
from torch import nn

import normgraph
from normgraph.codegen import ORTHOGONALIZERS, MapOptions
from normgraph.optim import normgraph_step

PACKAGE = Path(normgraph.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> nx.DiGraph:
    """Module → module it imports, for every import statement anywhere in the file (inside
    functions too), resolved to normgraph's own modules. `from pkg import name` points at the
    submodule `pkg.name` when there is one, else at `pkg` itself."""
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import normgraph.core.graph` → that module
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name:
                    g.add_edge(name, t)
    return g


def test_no_import_cycle_counting_function_level_imports() -> None:
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, f"import cycles: {cycles[:3]}"


#: Which subpackages each layer may import (besides itself). The data layer is at the bottom.
ALLOWED = {
    "normgraph.core": set(),
    "normgraph.analysis": {"normgraph.core"},
    "normgraph.codegen": {"normgraph.core"},
    "normgraph.io": {"normgraph.core"},
    "normgraph.optim": {"normgraph.core", "normgraph.codegen"},
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_pass_imports_only_the_layers_below_it(layer: str) -> None:
    g = import_graph()
    bad = []
    for mod in g:
        if mod == layer or mod.startswith(layer + "."):
            for dep in g.successors(mod):
                top = ".".join(dep.split(".")[:2])
                if top != layer and top not in ALLOWED[layer]:
                    bad.append(f"{mod} → {dep}")
    assert not bad, bad


def test_a_new_orthogonalizer_in_a_few_lines_matches_the_builtin_svd() -> None:
    def exact_polar(x: torch.Tensor) -> torch.Tensor:  # (B, m, n), m <= n
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        return u @ vh

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    x = torch.randn(8, 6)
    with ORTHOGONALIZERS.scoped():
        normgraph.register_orthogonalizer("polar", exact_polar, dtypes=(torch.float64,),
                                          flops=lambda m, n, s: 2.0 * 10 * m * m * n)
        updates = {}
        for name in ("svd", "polar"):
            torch.manual_seed(0)
            model = Net().double()
            opt = normgraph.compile(model, (x.double(),), orthogonalizer=name, compile_mode="eager", lr=0.1)
            model(x.double()).square().sum().backward()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.step()
            updates[name] = {n: before[n] - p.detach() for n, p in model.named_parameters()}
            if name == "polar":
                assert "_orthogonalizer_polar" in opt.source
                assert normgraph.codegen.flops(opt.norm_graph.atoms.values(), opt.map_options) > 0
        for n in updates["svd"]:
            torch.testing.assert_close(updates["polar"][n], updates["svd"][n], rtol=1e-10, atol=1e-12, msg=n)
        with pytest.raises(ValueError, match="computes in float64, not torch.float32"):
            normgraph.compile(Net(), (x,), orthogonalizer="polar", compute_dtype=torch.float32)
        with pytest.raises(ValueError, match="taken by the generated code"):
            normgraph.register_orthogonalizer("row-normalize", exact_polar)
    with pytest.raises(ValueError, match="unknown orthogonalizer 'polar'; registered: newton-schulz, svd"):
        normgraph.compile(Net(), (x,), orthogonalizer="polar")


def test_map_options_are_in_the_state_dict_and_a_loaded_state_dict_regenerates_the_map() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    opt = normgraph.compile(model, (x,), ns_steps=3, compute_dtype=torch.float64, compile_mode="eager")
    assert opt.map_options == MapOptions(ns_steps=3, compute_dtype="float64", compile_mode="eager")
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # plain values only
    assert saved["param_groups"][0]["map_options"]["ns_steps"] == 3
    other = normgraph.compile(model, (x,), compile_mode="eager")
    assert "5 steps" in other.source
    other.load_state_dict(saved)
    assert other.map_options.ns_steps == 3 and "3 steps" in other.source
    for g in other.param_groups:  # options are per optimizer: all groups change together
        g["map_options"] = {**g["map_options"], "ns_steps": 4}
    assert "4 steps" in other.source
    other.param_groups[0]["map_options"] = {**other.param_groups[0]["map_options"], "ns_steps": 2}
    with pytest.raises(ValueError, match="other map_options than the rest"):
        other.dualize


def test_functional_step_is_the_optimizer_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    opt = normgraph.compile(model, (x,), lr=0.05, momentum=0.9, weight_decay=0.1, compile_mode="eager")
    params = [g["params"][0] for g in opt.param_groups]
    copies = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        grads = [p.grad.clone() for p in params]
        normgraph_step(copies, grads, buffers, opt.dualize, lrs=[0.05] * len(params), momenta=[0.9] * len(params),
                       nesterovs=[True] * len(params), weight_decays=[0.1] * len(params))
        opt.step()
        for p, c in zip(params, copies):
            torch.testing.assert_close(p.detach(), c, rtol=0, atol=0)


def test_functional_step_with_row_moments_is_the_optimizer_step_on_an_embedding() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.tensor([[0, 1, 1, 3], [2, 2, 0, 1]])
    opt = normgraph.compile(model, (x,), lr=0.05, momentum=0.9, row_confidence=True, compile_mode="eager")
    params = [g["params"][0] for g in opt.param_groups]
    copies = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    moments = [torch.zeros(p.shape[0], dtype=p.dtype) if opt.atom(k).kind == "embedding" else None
               for k, p in enumerate(params)]
    assert sum(m is not None for m in moments) == 1
    for step in range(1, 4):
        opt.zero_grad()
        model(x).square().sum().backward()
        grads = [p.grad.clone() for p in params]
        normgraph_step(copies, grads, buffers, opt.dualize, lrs=[0.05] * len(params), momenta=[0.9] * len(params),
                       nesterovs=[True] * len(params), weight_decays=[g["weight_decay"] for g in opt.param_groups],
                       row_moments=moments, row_steps=[step] * len(params))
        opt.step()
        for p, c in zip(params, copies):
            torch.testing.assert_close(p.detach(), c, rtol=0, atol=0)


def test_register_op_teaches_every_table_in_one_call() -> None:
    from normgraph.analysis import ops, rules, scale
    from normgraph.analysis.rules import AtomSpec

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4))
            self.lin = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.lin(torch.special.expit(x) * torch.exp(self.w))

    tables = (ops.ALIASES, rules.PARAM_FLOW, rules.ATOM_RULES, rules.BOND_RULES, scale.SCALE_RULES,
              scale.SCALED_BOND_RULES)
    x = (torch.randn(2, 4),)
    before = normgraph.analyze(Net(), x)
    assert before.atoms["w"].kind == "fallback" and before.diagnostics.assumed_ops
    with tables[0].scoped(), tables[1].scoped(), tables[2].scoped(), tables[3].scoped(), \
            tables[4].scoped(), tables[5].scoped():
        normgraph.register_op("exp", atom=lambda use: AtomSpec("gain", note="log-gain"), bond=1.0)
        normgraph.register_op("sigmoid", aliases=("expit", "special_expit"), bond=0.25,
                              scale=lambda node, args, S: 1.0)
        ng = normgraph.analyze(Net(), x)
        assert ng.atoms["w"].kind == "gain" and not ng.diagnostics.assumed_ops
    assert "expit" not in ops.ALIASES and "exp" not in rules.ATOM_RULES


def test_row_shards_follow_fsdp2_chunking_and_empty_shards_dualise() -> None:
    """9 rows on 4 ranks: chunks of 3, the last rank empty; the elementwise duals take (0, d)."""
    from normgraph.codegen import dual
    from normgraph.optim.fsdp import local_rows

    assert [local_rows(9, 4, r) for r in range(4)] == [(0, 3), (3, 3), (6, 3), (9, 0)]
    assert [local_rows(65, 2, r) for r in range(2)] == [(0, 33), (33, 32)]
    for t in (torch.zeros(0, 4), torch.zeros(0)):
        assert dual.row_normalize(t).shape == t.shape and dual.rms_normalize(t).shape == t.shape


def test_the_meta_shadow_of_a_sharded_model_analyses_buffers_it_cannot_read(monkeypatch) -> None:
    """FSDP2's analysis runs on meta tensors: a stored constant (√d) has no value there and is
    read as an unknown constant instead of crashing the scale rules."""
    from normgraph.analysis import wrappers

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8, bias=False)
            self.register_buffer("scale", torch.tensor(8.0).sqrt())

        def forward(self, x):
            return self.lin(x * self.scale)

    monkeypatch.setattr(wrappers, "is_sharded", lambda model: True)
    ng = normgraph.analyze(Scaled(), (torch.randn(2, 8),))
    assert "meta-device shadow" in " ".join(ng.diagnostics.notes)
    assert ng.atoms["lin.weight"].downstream == pytest.approx(1.0)  # unknown constant: scale 1


def test_a_state_dict_saved_without_map_options_still_loads() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    opt = normgraph.compile(model, (x,), compile_mode="eager")
    model(x).sum().backward()
    opt.step()
    old = opt.state_dict()
    for g in old["param_groups"]:
        del g["map_options"]  # the format before map options were saved
    again = normgraph.compile(model, (x,), compile_mode="eager", ns_steps=3)
    again.load_state_dict(old)
    assert again.map_options.ns_steps == 3
    again.step()
