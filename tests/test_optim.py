"""The optimizer: exact update norms per kind, skipping, schedulers, resume, errors."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import normgraph
from normgraph.io import annotations
from normgraph.codegen import dual
from normgraph.codegen import orthogonalizers as ortho
from normgraph.core import layout
from normgraph.core import Atom, NormGraph
from normgraph.optim import NormGraphOptimizer

CUDA = torch.cuda.is_available()
EAGER = dict(compile_mode="eager")  # torch.compile is covered by test_codegen; keep these fast


class Net(nn.Module):
    """Every atom kind: linear, grouped + depthwise conv, expert stack, embedding, gain, bias."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 12)
        self.ln = nn.LayerNorm(12)
        self.experts = nn.Parameter(torch.randn(3, 5, 12) * 0.2)
        self.conv = nn.Conv2d(4, 6, 3, groups=2, padding=1, bias=False)
        self.dw = nn.Conv2d(6, 6, 3, groups=6, padding=1, bias=False)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.fc(self.emb(tokens)))
        moe = torch.einsum("eoi,bti->beto", self.experts, h)
        return moe.square().mean() + self.dw(self.conv(image)).square().mean()


def _matrix(out: int, inp: int) -> dict:
    return layout.matrix_options([1, out, inp], [0, 1, 2], 1, out, inp)


def _conv(out: int, inp: int, groups: int, k: int) -> dict:
    kk = k * k
    return layout.matrix_options([groups, out // groups, inp // groups, kk], [0, 3, 1, 2],
                                 groups * kk, out // groups, inp // groups, kk)


def norm_graph() -> NormGraph:
    atoms = [
        Atom("emb.weight", "embedding", (10, 8), budget=0.9),
        Atom("fc.weight", "linear", (12, 8), budget=0.5, options=_matrix(12, 8)),
        Atom("fc.bias", "bias", (12,), budget=0.05),
        Atom("ln.weight", "gain", (12,), budget=0.1),
        Atom("ln.bias", "bias", (12,), budget=0.07),
        Atom("experts", "expert", (3, 5, 12), budget=0.4, options=layout.matrix_options([3, 5, 12], [0, 1, 2], 3, 5, 12)),
        Atom("conv.weight", "conv", (6, 2, 3, 3), budget=0.3, options=_conv(6, 4, 2, 3)),
        Atom("dw.weight", "conv", (6, 1, 3, 3), budget=0.2, options=_conv(6, 6, 6, 3)),
    ]
    return NormGraph({a.name: a for a in atoms})


TOKENS = torch.tensor([[1, 2, 2, 5]])  # rows 0, 3, 4, 6.. of the embedding get no gradient


def backward(model: Net, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = model.fc.weight.dtype
    model(TOKENS, torch.randn(2, 4, 5, 5, generator=gen, dtype=dtype)).backward()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("lr", [0.1, 0.013])
def test_svd_update_has_norm_lr_times_budget_for_every_kind(lr: float) -> None:
    torch.manual_seed(0)
    model, ng = Net().double(), norm_graph()
    opt = NormGraphOptimizer(model, ng, lr=lr, momentum=0.0, nesterov=False, orthogonalizer="svd", **EAGER)
    backward(model)
    before = snapshot(model)
    opt.step()
    for name, p in model.named_parameters():
        delta = before[name] - p.detach()
        atom = ng.atoms[name]
        assert layout.atom_norm(atom, delta) == pytest.approx(lr * atom.budget, rel=1e-6), name
    emb_delta = before["emb.weight"] - model.emb.weight.detach()
    untouched = [r for r in range(10) if r not in TOKENS.tolist()[0]]
    assert torch.equal(emb_delta[untouched], torch.zeros(len(untouched), 8, dtype=torch.float64))


@pytest.mark.parametrize("ns_method", ["auto", "direct", "gram"])
def test_newton_schulz_step_is_close_to_budget(ns_method: str) -> None:
    torch.manual_seed(0)
    model, ng = Net(), norm_graph()
    opt = NormGraphOptimizer(model, ng, lr=1.0, momentum=0.0, nesterov=False, ns_coefficients="polar-express",
                             ns_method=ns_method, **EAGER)
    gram = ns_method == "gram" or (ns_method == "auto" and ortho.compute_dtype(torch.device("cpu")) == torch.float32)
    assert ("gram_form=True" in opt.source) == gram  # experts are 5×12: n >= 2m, below bf16's 256-row minimum
    backward(model)
    before = snapshot(model)
    opt.step()
    for name in ("fc.weight", "experts"):
        ratio = layout.atom_norm(ng.atoms[name], before[name] - getattr_param(model, name)) / ng.atoms[name].budget
        assert 0.8 <= ratio <= 1.2, name


def getattr_param(model: nn.Module, name: str) -> torch.Tensor:
    return dict(model.named_parameters())[name].detach()


@pytest.mark.parametrize("row_confidence", [True, False])
def test_momentum_nesterov_and_weight_decay_follow_the_formulas(row_confidence: bool) -> None:
    torch.manual_seed(0)
    model, ng = Net().double(), norm_graph()
    lr, m, wd = 0.05, 0.9, 0.1
    opt = NormGraphOptimizer(model, ng, lr=lr, momentum=m, nesterov=True, weight_decay=wd, orthogonalizer="svd",
                             row_confidence=row_confidence, **EAGER)
    bufs = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    mean_sq = {n: 0.0 for n in bufs}
    for seed in range(3):
        opt.zero_grad()
        backward(model, seed)
        expect = {}
        for n, p in model.named_parameters():
            bufs[n] = m * bufs[n] + (1 - m) * p.grad
            direction = (1 - m) * p.grad + m * bufs[n]
            update = dual.dualize_atom(ng.atoms[n], direction, orthogonalizer="svd")
            if row_confidence and ng.atoms[n].kind == "embedding":
                # signal ratio of each row: |EMA of g| over sqrt(EMA of g²), both divided by 1 − m^t
                mean_sq[n] = m * mean_sq[n] + (1 - m) * (p.grad ** 2).mean(dim=1)
                debias = 1 - m ** (seed + 1)
                ratio = ((bufs[n] / debias) ** 2).mean(dim=1).sqrt() / (mean_sq[n] / debias).sqrt()
                ratio = ratio.nan_to_num(0.0)  # a token never seen: no gradient, no step
                assert bool((ratio <= 1 + 1e-12).all())
                update = update * (ratio / ratio.max())[:, None]
            expect[n] = p.detach() * (1 - lr * wd) - lr * update
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expect[n], rtol=1e-10, atol=1e-10, msg=n)


def test_missing_grads_and_frozen_params_do_not_move() -> None:
    torch.manual_seed(0)
    model, ng = Net(), norm_graph()
    model.ln.weight.requires_grad_(False)
    opt = NormGraphOptimizer(model, ng, weight_decay=0.5, **EAGER)
    assert "ln.weight" not in [g["name"] for g in opt.param_groups]
    backward(model)
    model.fc.bias.grad = None  # e.g. unused this step
    before = snapshot(model)
    opt.step()
    for n in ("ln.weight", "fc.bias"):
        assert torch.equal(getattr_param(model, n), before[n]), n
    assert not torch.equal(getattr_param(model, "fc.weight"), before["fc.weight"])
    assert len(opt._maps) == 2  # the full map (built up front) and one for the present subset


def test_zero_gradient_gives_zero_update() -> None:
    model, ng = Net(), norm_graph()
    opt = NormGraphOptimizer(model, ng, **EAGER)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = snapshot(model)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_non_finite_gradient_skips_the_whole_step() -> None:
    torch.manual_seed(0)
    model, ng = Net(), norm_graph()
    opt = NormGraphOptimizer(model, ng, weight_decay=0.1, **EAGER)
    backward(model)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    before = snapshot(model)
    opt.zero_grad()
    backward(model, 1)
    model.fc.weight.grad[0, 0] = float("nan")
    model.experts.grad[1, 2, 3] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite gradient in fc.weight, experts"):
        opt.step()
    assert opt.last_step_skipped and opt.skipped_steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["momentum_buffer"], state["state"][k]["momentum_buffer"])
    opt.zero_grad()
    backward(model, 2)
    opt.step()
    assert not opt.last_step_skipped


def test_huge_but_finite_gradients_are_not_skipped() -> None:
    """The finite check's fast pass (2-norms) overflows on entries near 1e19; those tensors are
    re-checked exactly, so a finite gradient of 1e30 still steps (the map normalises it)."""
    torch.manual_seed(0)
    model, ng = Net(), norm_graph()
    opt = NormGraphOptimizer(model, ng, momentum=0.0, nesterov=False, **EAGER)
    backward(model)
    for p in model.parameters():
        p.grad.mul_(1e30)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    before = snapshot(model)
    opt.step()
    assert not opt.last_step_skipped
    assert not torch.equal(model.fc.weight.detach(), before["fc.weight"])


def test_functional_finite_check_and_update() -> None:
    from normgraph.optim import functional as F
    xs = [torch.randn(4, 5), torch.randn(3)]
    assert F.all_finite(xs) and F.all_finite([x * 1e30 for x in xs]) and F.all_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        ys = [x.clone() for x in xs]
        ys[1][2] = bad
        assert not F.all_finite(ys) and not F.all_finite([ys[0] * 1e30, ys[1]])
    params, updates = [x.clone() for x in xs], [torch.ones(4, 5), torch.ones(3)]
    F.apply_updates(params, updates, lrs=[0.1, 0.5], weight_decays=[0.0, 0.2])
    torch.testing.assert_close(params[0], xs[0] - 0.1, rtol=0, atol=1e-6)
    torch.testing.assert_close(params[1], xs[1] * (1 - 0.5 * 0.2) - 0.5, rtol=0, atol=1e-6)


def test_state_dict_resume_is_bit_identical() -> None:
    def run(steps: range, model: Net, opt: NormGraphOptimizer) -> None:
        for seed in steps:
            opt.zero_grad()
            backward(model, seed)
            opt.step()

    torch.manual_seed(0)
    model = Net()
    kw = dict(lr=0.05, weight_decay=0.01, ns_coefficients="polar-express", **EAGER)
    opt = NormGraphOptimizer(model, norm_graph(), **kw)
    run(range(3), model, opt)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(range(3, 6), model, opt)

    resumed = Net()
    resumed.load_state_dict(saved_model)
    opt2 = NormGraphOptimizer(resumed, norm_graph(), **kw)
    opt2.load_state_dict(saved_opt)
    run(range(3, 6), resumed, opt2)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_default_momentum_is_0_9_and_an_older_checkpoint_keeps_its_own() -> None:
    """The default moved 0.95 → 0.9 (docs/results.md §17). compile and the optimizer class must
    agree, and a state dict saved under the old default must resume with 0.95, as torch's
    Optimizer contract restores every group's hyperparameters."""
    import inspect
    for fn in (normgraph.compile, NormGraphOptimizer):
        assert inspect.signature(fn).parameters["momentum"].default == 0.9
    torch.manual_seed(0)
    model = Net()
    old = NormGraphOptimizer(model, norm_graph(), momentum=0.95, **EAGER)
    backward(model)
    old.step()
    opt = NormGraphOptimizer(model, norm_graph(), **EAGER)
    assert {g["momentum"] for g in opt.param_groups} == {0.9}
    opt.load_state_dict(old.state_dict())
    assert {g["momentum"] for g in opt.param_groups} == {0.95}


def test_lr_scheduler_and_per_parameter_lr() -> None:
    torch.manual_seed(0)
    model, ng = Net().double(), norm_graph()
    opt = NormGraphOptimizer(model, ng, lr=0.1, momentum=0.0, orthogonalizer="svd", **EAGER)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.group("fc.weight")["lr"] = 0.3
    opt.group("fc.weight")["initial_lr"] = 0.3
    for expected_fc, expected_other in [(0.3, 0.1), (0.15, 0.05), (0.075, 0.025)]:
        opt.zero_grad()
        backward(model)
        before = snapshot(model)
        opt.step()
        sched.step()
        fc = layout.atom_norm(ng.atoms["fc.weight"], before["fc.weight"] - model.fc.weight.detach())
        ex = layout.atom_norm(ng.atoms["experts"], before["experts"] - model.experts.detach())
        assert fc == pytest.approx(expected_fc * 0.5, rel=1e-6)
        assert ex == pytest.approx(expected_other * 0.4, rel=1e-6)


def test_changing_a_budget_regenerates_the_map() -> None:
    model, ng = Net(), norm_graph()
    opt = NormGraphOptimizer(model, ng, **EAGER)
    old = opt.source
    ng.atoms["fc.weight"].budget = 0.25
    backward(model)
    opt.step()
    assert opt.source != old and repr(0.25 * (12 / 8) ** 0.5) in opt.source


def test_closure_and_zero_grad() -> None:
    model = Net()
    opt = NormGraphOptimizer(model, norm_graph(), **EAGER)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(TOKENS, torch.ones(1, 4, 5, 5))
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_compile_entry_point_with_annotations(tmp_path) -> None:
    model, ng = Net(), norm_graph()
    opt = normgraph.compile(model, annotations=ng, lr=0.2, compile_mode="eager")
    assert isinstance(opt, NormGraphOptimizer) and opt.norm_graph is ng
    assert "def dualize(grads, out=None):" in opt.source and opt.param_groups[0]["lr"] == 0.2


def test_compile_from_a_hand_edited_annotation_file(tmp_path) -> None:
    """A mass edited in the JSON file changes the budgets the optimizer steps with."""
    import json

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3, bias=False))
    path = normgraph.analyze(model).save(tmp_path / "mlp.json")
    doc = json.loads(path.read_text())
    for item in doc["atoms"]:
        if item["name"] == "0.weight":
            item["mass"] = 3.0  # total mass 4: budgets 3/4 and 1/4
    path.write_text(json.dumps(doc))
    opt = normgraph.compile(model, annotations=str(path), lr=0.1, momentum=0.0, nesterov=False,
                            orthogonalizer="svd", compile_mode="eager")
    assert opt.norm_graph.atoms["0.weight"].budget == pytest.approx(0.75)
    model(torch.randn(5, 6)).square().sum().backward()
    before = snapshot(model)
    opt.step()
    for name, budget in (("0.weight", 0.75), ("2.weight", 0.25)):
        moved = layout.atom_norm(opt.norm_graph.atoms[name], before[name] - dict(model.named_parameters())[name].detach())
        assert moved == pytest.approx(0.1 * budget, rel=1e-5)
    bigger = torch.nn.Sequential(torch.nn.Linear(6, 9, bias=False), torch.nn.ReLU(), torch.nn.Linear(9, 3, bias=False))
    with pytest.raises(ValueError, match=r"(?s)2 mismatches.*'0.weight': shape \[8, 6\].*'2.weight': shape"):
        normgraph.compile(bigger, annotations=str(path), compile_mode="eager")


def test_bad_ns_method_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown ns_method 'gramm'"):
        NormGraphOptimizer(Net(), norm_graph(), ns_method="gramm", **EAGER)
    with pytest.raises(ValueError, match="unknown ns_method 'Gram'"):
        NormGraphOptimizer(Net(), norm_graph(), ns_method="Gram", compute_dtype=torch.bfloat16, **EAGER)


def test_mismatched_annotations_raise_clear_errors() -> None:
    ng = norm_graph()
    ng.atoms["ghost.weight"] = Atom("ghost.weight", "bias", (3,))
    with pytest.raises(ValueError, match="ghost.weight.*re-run normgraph.analyze"):
        NormGraphOptimizer(Net(), ng, **EAGER)
    ng = norm_graph()
    ng.atoms["fc.bias"].shape = (13,)
    with pytest.raises(ValueError, match="'fc.bias' has shape"):
        NormGraphOptimizer(Net(), ng, **EAGER)
    ng = norm_graph()
    del ng.atoms["ln.bias"]
    with pytest.warns(RuntimeWarning, match="NOT optimized: \\['ln.bias'\\]"):
        NormGraphOptimizer(Net(), ng, **EAGER)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_optimizer_on_cuda_compiled() -> None:
    torch.manual_seed(0)
    model, ng = Net().cuda(), norm_graph()
    opt = NormGraphOptimizer(model, ng, lr=0.1, momentum=0.0, nesterov=False)
    gen = torch.Generator().manual_seed(0)
    model(TOKENS.cuda(), torch.randn(2, 4, 5, 5, generator=gen).cuda()).backward()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # compilation must work on CUDA
        opt.step()
    assert opt.dualize.compiled
    for n, p in model.named_parameters():
        ratio = layout.atom_norm(ng.atoms[n], before[n] - p.detach()) / (0.1 * ng.atoms[n].budget)
        assert 0.6 <= ratio <= 1.3, n
