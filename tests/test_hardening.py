"""Bad inputs get a clear error where they enter (issue 13's non-finite hyperparameters)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

import normgraph
from normgraph.io.annotations import AnnotationError


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 2, bias=False))


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_non_finite_or_negative_masses_are_refused_naming_the_key(value):
    with pytest.raises(ValueError, match=r"masses\['2'\] = .*finite and non-negative"):
        normgraph.analyze(mlp(), (torch.randn(2, 4),), masses={"2": value})


@pytest.mark.parametrize("bad", ["Infinity", "NaN", "-Infinity"])
def test_annotations_with_non_finite_numbers_are_refused(tmp_path, bad):
    ng = normgraph.analyze(mlp(), (torch.randn(2, 4),))
    text = ng.save(tmp_path / "a.json").read_text()
    doc = json.loads(text)
    doc["atoms"][0]["mass"] = "__BAD__"
    (tmp_path / "b.json").write_text(json.dumps(doc).replace('"__BAD__"', bad))
    with pytest.raises(AnnotationError, match="mass"):
        normgraph.load(tmp_path / "b.json")


@pytest.mark.parametrize("kw", [{"lr": math.nan}, {"lr": math.inf}, {"weight_decay": math.nan},
                                {"momentum": math.nan}])
def test_non_finite_optimizer_hyperparameters_are_refused(kw):
    with pytest.raises(ValueError, match="finite"):
        normgraph.compile(mlp(), (torch.randn(2, 4),), compile_mode="eager", **kw)


def test_register_kind_refuses_an_infinite_mass():
    with pytest.raises(ValueError, match="finite"):
        normgraph.register_kind("strange", dual="rms_normalize", norm="RMS", mass=math.inf)


@pytest.mark.parametrize("dtype, big", [(torch.float16, 300.0), (torch.float32, 1e20), (torch.bfloat16, 1e30)])
def test_large_gradients_give_full_size_updates_not_zero(dtype, big):
    """Squaring 300 overflows fp16 (and 1e20 fp32): the duals used to return exactly 0."""
    from normgraph.codegen import dual
    from normgraph.codegen import orthogonalizers as ortho
    g = torch.full((3, 5), big, dtype=dtype)
    g[0, 0] = -big
    for out in (dual.rms_normalize(g), dual.row_normalize(g)):
        assert out.dtype == dtype
        assert out.float().pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-2)
    m = torch.randn(2, 4, 6, dtype=torch.float32) * big if dtype == torch.float32 else torch.randn(2, 4, 6)
    sigma = torch.linalg.matrix_norm(ortho.newton_schulz(m, 5), 2)
    assert bool((sigma > 0.5).all() and (sigma < 1.5).all())


def test_fp16_model_with_a_huge_gradient_still_updates_every_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)).half()
    opt = normgraph.compile(model, (torch.randn(2, 4).half(),), lr=0.1, momentum=0.0, compile_mode="eager")
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 1000.0)  # a static loss scale: finite in fp16, squares overflow
    opt.step()
    assert not opt.last_step_skipped
    for (name, p), b in zip(model.named_parameters(), before):
        assert (p.detach() - b).abs().max().item() > 0, name


class Two(nn.Module):
    """The same layers, registered in either order (same names, same shapes)."""

    def __init__(self, reverse: bool = False) -> None:
        super().__init__()
        if reverse:
            self.emb = nn.Embedding(8, 4)
            self.lin = nn.Linear(4, 4, bias=False)
        else:
            self.lin = nn.Linear(4, 4, bias=False)
            self.emb = nn.Embedding(8, 4)

    def forward(self, ids):
        return self.lin(self.emb(ids))


def _stepped(model: nn.Module):
    ids = torch.randint(0, 8, (2, 3))
    opt = normgraph.compile(model, (ids,), compile_mode="eager")
    model(ids).square().mean().backward()
    opt.step()
    return opt


def test_load_state_dict_matches_groups_by_name_not_position():
    torch.manual_seed(0)
    a = _stepped(Two())
    b = normgraph.compile(Two(reverse=True), (torch.randint(0, 8, (2, 3)),), compile_mode="eager")
    assert [g["name"] for g in a.param_groups] != [g["name"] for g in b.param_groups]
    b.load_state_dict(a.state_dict())
    for name in ("lin.weight", "emb.weight"):
        pa, pb = a.group(name)["params"][0], b.group(name)["params"][0]
        torch.testing.assert_close(b.state[pb]["momentum_buffer"], a.state[pa]["momentum_buffer"])
        assert b.group(name)["name"] == name
    assert [g["name"] for g in b.param_groups] == ["emb.weight", "lin.weight"]  # order kept


def test_load_state_dict_of_other_parameters_is_refused():
    a = _stepped(Two())
    other = normgraph.compile(mlp(), (torch.randn(2, 4),), compile_mode="eager")
    with pytest.raises(ValueError, match=r"other parameters: missing \['0.weight', '2.weight'\]; unknown"):
        other.load_state_dict(a.state_dict())


def test_add_param_group_checks_the_name_and_the_tensor():
    model = Two()
    opt = normgraph.compile(model, (torch.randint(0, 8, (2, 3)),), compile_mode="eager")
    with pytest.raises(ValueError, match="already has a param group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4, 4))], "name": "lin.weight"})
    with pytest.raises(ValueError, match="no atom"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4, 4))], "name": "nope"})


def test_empty_parameters_are_skipped_not_a_crash():
    model = nn.Sequential(nn.Linear(4, 0), nn.Linear(0, 3), nn.Linear(4, 2))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m[2](x) + self.m[1](self.m[0](x)).sum() * 0

    net = Net()
    opt = normgraph.compile(net, (torch.randn(2, 4),), compile_mode="eager")
    assert all(a.shape and min(a.shape) > 0 for a in opt.norm_graph.atoms.values())
    net(torch.randn(2, 4)).sum().backward()
    opt.step()


def test_complex_parameters_are_refused_at_analysis():
    class C(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))

        def forward(self, x):
            return (x.to(torch.complex64) @ self.w).real

    with pytest.raises(ValueError, match="complex parameters are not supported.*view_as_real"):
        normgraph.analyze(C(), (torch.randn(2, 3),))


def test_sparse_gradients_get_a_clear_error():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    ids = torch.randint(0, 10, (2, 3))
    opt = normgraph.compile(model, (ids,), compile_mode="eager")
    model(ids).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradients are not supported \(0.weight\).*sparse=False"):
        opt.step()


def test_meta_device_model_is_refused_then_works_after_to_empty():
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        normgraph.compile(model, (torch.randn(2, 4, device="meta"),), compile_mode="eager")
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        nn.init.normal_(p)
    opt = normgraph.compile(model, (torch.randn(2, 4),), compile_mode="eager")
    model(torch.randn(2, 4)).sum().backward()
    opt.step()


def test_a_subset_of_the_parameters_gets_a_clear_message():
    model = mlp()
    ng = normgraph.analyze(model, (torch.randn(2, 4),))
    subset = [(n, p) for n, p in model.named_parameters() if n.startswith("0.")]
    with pytest.raises(ValueError, match="not among the parameters given"):
        normgraph.NormGraphOptimizer(subset, ng)


def _saved(tmp_path, edit):
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    ng = normgraph.analyze(model, (torch.randn(2, 4),))
    doc = json.loads(ng.save(tmp_path / "a.json").read_text())
    edit(doc)
    (tmp_path / "b.json").write_text(json.dumps(doc))
    return tmp_path / "b.json"


def test_a_matrix_view_that_does_not_fit_the_shape_is_refused_at_load(tmp_path):
    def edit(doc):
        doc["atoms"][0]["options"]["matrix"] = [1, 4, 4]   # the weight is 6×4
    with pytest.raises(AnnotationError, match=r"'0.weight'\)\.options: .*matrix view \[1, 4, 4\]"):
        normgraph.load(_saved(tmp_path, edit))


def test_downstream_zero_is_refused_not_a_misleading_budget_warning(tmp_path):
    def edit(doc):
        doc["atoms"][0]["downstream"] = 0
    with pytest.raises(AnnotationError, match=r"downstream: expected a positive number"):
        normgraph.load(_saved(tmp_path, edit))


def test_a_non_finite_lr_set_after_construction_is_refused_at_step():
    model = mlp()
    opt = normgraph.compile(model, (torch.randn(2, 4),), compile_mode="eager")
    opt.group("2.weight")["lr"] = math.inf  # e.g. a scheduler gone wrong
    model(torch.randn(2, 4)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"non-finite lr .*2.weight.*inf; nothing was changed"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
