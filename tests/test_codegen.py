"""Generated duality map: agrees with the reference maps, reads well, compiles, caches."""
from __future__ import annotations

import inspect
import traceback

import pytest
import torch

from normgraph import codegen
from normgraph.codegen import dual
from normgraph.codegen import orthogonalizers as ortho
from normgraph.core import layout
from normgraph.core import Atom

CUDA = torch.cuda.is_available()


def linear(name: str, out: int, inp: int, budget: float = 0.5) -> Atom:
    return Atom(name, "linear", (out, inp), budget=budget,
                options=layout.matrix_options([1, out, inp], [0, 1, 2], 1, out, inp))


def conv(name: str, out: int, inp: int, groups: int, k: int, budget: float = 0.3) -> Atom:
    kk = k * k
    return Atom(name, "conv", (out, inp // groups, k, k), budget=budget,
                options=layout.matrix_options([groups, out // groups, inp // groups, kk], [0, 3, 1, 2],
                                              groups * kk, out // groups, inp // groups, kk))


def atoms() -> list[Atom]:
    return [
        linear("blocks.0.fc.weight", 32, 16), linear("blocks.1.fc.weight", 32, 16, budget=0.25),
        linear("head.weight", 8, 32), conv("conv.weight", 8, 4, 2, 3), conv("dw.weight", 6, 6, 6, 3),
        Atom("experts", "expert", (3, 8, 4), budget=0.4, options=layout.matrix_options([3, 8, 4], [0, 1, 2], 3, 8, 4)),
        Atom("emb.weight", "embedding", (10, 8), budget=1.0), Atom("ln.weight", "gain", (16,), budget=0.1),
        Atom("fc.bias", "bias", (32,), budget=0.05),
        # a linear and a 1×1 conv with the same 8×4 matrix share a group (plain + permuted views)
        linear("proj.weight", 8, 4, budget=0.6), conv("pw.weight", 8, 4, 1, 1, budget=0.7),
    ]


def grads(ats: list[Atom], device: str = "cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(a.shape, generator=gen).to(device) for a in ats]


@pytest.mark.parametrize("orthogonalizer", ortho.ORTHOGONALIZERS)
@pytest.mark.parametrize("schedule", ortho.SCHEDULES)
def test_generated_map_matches_reference(orthogonalizer: str, schedule: str) -> None:
    ats, gs = atoms(), grads(atoms())
    _, fn = codegen.generate(ats, orthogonalizer=orthogonalizer, ns_coefficients=schedule, compile_mode="eager")
    for a, g, u in zip(ats, gs, fn(gs)):
        ref = dual.dualize_atom(a, g, orthogonalizer=orthogonalizer, ns_coefficients=schedule)
        assert u.shape == g.shape and u.dtype == g.dtype
        torch.testing.assert_close(u, ref, atol=2e-5, rtol=1e-4, msg=a.name)


def test_source_is_readable_and_batches_same_shapes() -> None:
    source, fn = codegen.generate(atoms(), compile_mode="eager")
    assert "def dualize(grads, out=None):" in source
    # the two 32×16 linears share one stacked Newton–Schulz call, named in its group comment
    assert "orthogonalize 2 × (32×16)" in source and "blocks.0.fc.weight, blocks.1.fc.weight" in source
    assert source.count("_orthogonalizer_newton_schulz(") == 5  # 5 distinct matrix shapes (experts share 8×4)
    # per-atom scales are literals: budget · sqrt(fan_out/fan_in) / norm_scale
    assert repr(0.5 * (32 / 16) ** 0.5) in source and repr(0.25 * (32 / 16) ** 0.5) in source
    assert repr(ortho.POLAR_EXPRESS[0]) in source and "polar-express" in source  # the default schedule
    assert fn.source == source
    # the fake filename is registered so inspect and tracebacks can show the generated lines
    assert inspect.getsource(fn.eager).startswith("def dualize(grads, out=None):")
    with pytest.raises(Exception) as info:
        fn([torch.zeros(1)] * len(atoms()))
    assert "<normgraph-dualize-" in "".join(traceback.format_tb(info.value.__traceback__))


def test_gram_form_is_chosen_per_group_and_agrees() -> None:
    """auto: Gram form for the wide fp32 group (16×64: n = 4m), direct for the rest."""
    ats = [linear("wide.weight", 16, 64), linear("tall.weight", 96, 32), linear("sq.weight", 24, 24)]
    gs = grads(ats)
    source, auto = codegen.generate(ats, compile_mode="eager")
    assert source.count("gram_form=True") == 2 and "(16×64) float32 on cpu, Newton–Schulz on the matrices, Gram 16², iterated in Gram form" in source
    assert "o2 = _orthogonalizer_newton_schulz(grads[2].unsqueeze(0), coefficients=_COEFFICIENTS, safety=1.02)\n" in source  # square: direct
    direct_source, direct = codegen.generate(ats, ns_method="direct", compile_mode="eager")
    assert "gram_form=True" not in direct_source
    for u, v in zip(auto(gs), direct(gs)):
        torch.testing.assert_close(u, v, atol=2e-5, rtol=0)
    bf16_source, _ = codegen.generate(ats, compute_dtype=torch.bfloat16, compile_mode="eager")
    assert "gram_form=True" not in bf16_source  # bf16 below HALF_PRECISION_GRAM_MIN rows: direct
    big = [linear("wide.weight", 256, 1024), linear("tall.weight", 768, 256), linear("sq.weight", 24, 24)]
    big_gs = grads(big)
    bf16_source, bf16_auto = codegen.generate(big, compute_dtype=torch.bfloat16, compile_mode="eager")
    assert bf16_source.count("gram_form=True, gram_restarts=(2, 4)") == 2  # restarted in bf16
    assert "iterated in Gram form, re-formed from X before steps 2, 4" in bf16_source
    _, bf16_direct = codegen.generate(big, compute_dtype=torch.bfloat16, ns_method="direct", compile_mode="eager")
    _, fp32 = codegen.generate(big, compile_mode="eager")
    for u, v, w in zip(bf16_auto(big_gs), bf16_direct(big_gs), fp32(big_gs)):  # bf16 rounding from fp32, either form
        dev = [float(torch.linalg.matrix_norm(t - w, 2) / torch.linalg.matrix_norm(w, 2)) for t in (u, v)]
        assert dev[0] < 1.5 * dev[1] + 0.02, dev
    assert codegen.flops(big, ns_steps=5, compute_dtype=torch.bfloat16) == sum(
        ortho.ns_flops(*a.shape, 5, gram=g, restarts=2 * g) for a, g in zip(big, (True, True, False)))
    expected = sum(ortho.ns_flops(*a.shape, 5, gram=g) for a, g in zip(ats, (True, True, False)))
    assert codegen.flops(ats, ns_steps=5) == expected
    assert codegen.flops(ats, ns_steps=5, ns_method="direct") == sum(ortho.ns_flops(*a.shape, 5, False) for a in ats)


def test_zero_gradients_give_zero_updates() -> None:
    ats = atoms()
    _, fn = codegen.generate(ats, compile_mode="eager")
    for a, u in zip(ats, fn([torch.zeros(a.shape) for a in ats])):
        assert torch.equal(u, torch.zeros(a.shape)), a.name


def test_compiled_agrees_with_eager() -> None:
    """The one torch.compile test (inductor on CPU is slow): a small but mixed map."""
    ats = [linear("a", 32, 16), linear("b", 32, 16), conv("c", 8, 4, 2, 3), Atom("bias", "bias", (8,), budget=0.1)]
    gs = grads(ats)
    _, eager = codegen.generate(ats, compile_mode="eager")
    _, compiled = codegen.generate(ats)
    out = compiled(gs)
    assert compiled.compiled and compiled.compile_error is None
    for u, v in zip(out, eager(gs)):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


def test_compile_failure_warns_and_runs_eagerly() -> None:
    def broken_backend(gm, example_inputs):
        raise RuntimeError("backend exploded")

    ats, gs = atoms(), grads(atoms())
    _, fn = codegen.generate(ats, backend=broken_backend)
    with pytest.warns(RuntimeWarning, match="backend exploded"):
        out = fn(gs)
    assert not fn.compiled and "backend exploded" in fn.compile_error
    for u, v in zip(out, fn.eager(gs)):
        torch.testing.assert_close(u, v)


def test_cache_key_tracks_what_is_baked_in() -> None:
    ats = atoms()
    specs = [("float32", "cpu")] * len(ats)
    key = codegen.cache_key(ats, specs, ns_steps=5)
    assert key == codegen.cache_key(atoms(), specs, ns_steps=5)
    assert key != codegen.cache_key(ats, [("bfloat16", "cpu")] + specs[1:], ns_steps=5)
    assert key != codegen.cache_key(ats, specs, ns_steps=6)
    ats[0].budget = 0.7
    assert key != codegen.cache_key(ats, specs, ns_steps=5)


def test_bad_options_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown orthogonalizer"):
        codegen.generate(atoms(), orthogonalizer="qr")
    with pytest.raises(ValueError, match="compile_mode"):
        codegen.generate(atoms(), compile_mode="fast")
    with pytest.raises(ValueError, match="unknown ns_method 'fast'"):
        codegen.generate(atoms(), ns_method="fast")
    with pytest.raises(ValueError, match="'w'.*unknown duality map"):
        codegen.generate([Atom("w", "x", (2,), dual="warp")])


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_generated_map_on_cuda_compiled_and_eager() -> None:
    ats = atoms()
    gs = grads(ats, "cuda")
    specs = [codegen.spec_of(g) for g in gs]
    source, eager = codegen.generate(ats, specs=specs, compile_mode="eager")
    assert "torch.bfloat16" in source  # bf16 Newton–Schulz by default on CUDA
    _, compiled = codegen.generate(ats, specs=specs)
    out = compiled(gs)
    assert compiled.compiled, compiled.compile_error
    for a, u, v in zip(ats, out, eager(gs)):
        for w in (u, v):
            ratio = layout.atom_norm(a, w) / a.budget
            assert 0.6 <= ratio <= 1.3, (a.name, ratio)
        # bf16: compiled and eager kernels round differently, and 5 Polar Express steps amplify
        # that rounding along weak directions (entries differed by up to 0.12·budget on an H200),
        # so the two agree in direction, not entrywise (cosine ≥ 0.991 measured on CPU)
        cos = float((u * v).sum() / (u.norm() * v.norm()).clamp_min(1e-30))
        assert cos >= 0.97, (a.name, cos)


def test_cpu_default_compute_dtype_follows_native_bf16(monkeypatch) -> None:
    """bf16 on a CPU that multiplies bf16 natively (and on CUDA), fp32 otherwise; the
    environment variable overrides the probe; an explicit dtype always wins."""
    from normgraph.codegen import orthogonalizers as ortho
    cpu = torch.device("cpu")
    for flag, want in (("1", torch.bfloat16), ("0", torch.float32)):
        monkeypatch.setenv("NORMGRAPH_CPU_BF16", flag)
        ortho.cpu_has_fast_bf16.cache_clear()
        assert ortho.compute_dtype(cpu) == want
        assert ortho.compute_dtype(cpu, torch.float64) == torch.float64
        assert ortho.compute_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.delenv("NORMGRAPH_CPU_BF16")
    ortho.cpu_has_fast_bf16.cache_clear()
    caps = torch.cpu.get_capabilities()
    native = any(caps.get(f) for f in ortho.FAST_BF16_CPU_FLAGS)
    assert ortho.compute_dtype(cpu) == (torch.bfloat16 if native else torch.float32)
    monkeypatch.setenv("NORMGRAPH_CPU_BF16", "1")
    ortho.cpu_has_fast_bf16.cache_clear()
    at = [linear("wide.weight", 16, 64)]
    source, fn = codegen.generate(at, compile_mode="eager")
    assert "bfloat16" in source and "gram_form=True" not in source  # bf16, 16 rows: direct form
    monkeypatch.setenv("NORMGRAPH_CPU_BF16", "0")
    ortho.cpu_has_fast_bf16.cache_clear()
