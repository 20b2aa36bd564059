"""The step's memory: batches of at most `max_batch_bytes`, updates written into the gradients,
nothing but the momentum kept between steps (measured with torch.profiler's allocation events)."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import normgraph
from normgraph import codegen
from normgraph.codegen.emit import chunks
from normgraph.codegen.plan import plan
from normgraph.core import Atom, layout


def linear(name: str, out: int, inp: int, budget: float = 0.5) -> Atom:
    return Atom(name, "linear", (out, inp), budget=budget,
                options=layout.matrix_options([1, out, inp], [0, 1, 2], 1, out, inp))


def many(n: int = 12, rows: int = 64, cols: int = 48) -> list[Atom]:
    """n same-shaped matrices (one group), an odd one, a packed q/k/v with parts, a table, a gain."""
    parts = layout.part_options([(0, 32, layout.matrix_options([1, 32, 48], [0, 1, 2], 1, 32, 48)),
                                 (32, 16, layout.matrix_options([1, 16, 48], [0, 1, 2], 1, 16, 48)),
                                 (48, 16, layout.matrix_options([1, 16, 48], [0, 1, 2], 1, 16, 48))], 0)
    return ([linear(f"w{k}", rows, cols, budget=0.1 + 0.01 * k) for k in range(n)]
            + [linear("tall", 96, 32), Atom("qkv", "linear", (64, 48), budget=0.3, options=parts),
               Atom("emb", "embedding", (1000, 16), budget=1.0), Atom("ln", "gain", (48,), budget=0.1)])


def grads_for(ats: list[Atom], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(a.shape, generator=gen) for a in ats]


def peak_bytes(fn) -> int:
    """The largest sum of tensor bytes allocated and not yet freed while `fn()` runs."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    level = peak = 0
    for _, n in events:
        level += n
        peak = max(peak, level)
    return peak


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_batches_of_at_most_the_cap_give_the_unbatched_map(dtype) -> None:
    ats, gs = many(), grads_for(many())
    _, whole = codegen.generate(ats, compile_mode="eager", compute_dtype=dtype, max_batch_bytes=None)
    cap = 3 * 64 * 48 * 4  # three of the twelve 64×48 fp32 gradients per batch
    src, split = codegen.generate(ats, compile_mode="eager", compute_dtype=dtype, max_batch_bytes=cap)
    assert "in 4 batches of at most" in src and "for r in range(0, 1000, " in src  # the table in row blocks
    for a, u, v in zip(ats, whole([g.clone() for g in gs]), split([g.clone() for g in gs])):
        torch.testing.assert_close(v, u, atol=1e-6, rtol=0, msg=a.name)


def test_chunks_respect_the_cap_and_are_even() -> None:
    ats = many(n=10)
    specs = [(a.dtype, "cpu") for a in ats]
    group = next(g for g in plan(ats, specs) if g.rows == 64)
    size = 64 * 48 * 4
    for cap, expect in [(None, [10]), (10 * size, [10]), (4 * size, [4, 3, 3]), (size, [1] * 10), (size // 2, [1] * 10)]:
        got = [len(c) for c in chunks(group, cap)]
        assert sum(got) == 10 and (cap is None or all(n * size <= max(cap, size) for n in got)), (cap, got)
        assert max(got) - min(got) <= 1 if cap and cap >= size else True
        if expect is not None:
            assert sorted(got, reverse=True) == expect, (cap, got)


def test_the_map_writes_into_out_and_allocates_no_updates() -> None:
    ats = many()
    gs = grads_for(ats)
    _, fn = codegen.generate(ats, compile_mode="eager")
    fresh = fn([g.clone() for g in gs])
    targets = [torch.empty_like(g) for g in gs]
    got = fn([g.clone() for g in gs], out=targets)
    assert all(a is b for a, b in zip(got, targets))
    for u, v in zip(fresh, got):
        assert torch.equal(u, v)
    own = [g.clone() for g in gs]  # the gradients themselves: each batch reads them before it writes
    fn(own, out=own)
    for u, v in zip(fresh, own):
        assert torch.equal(u, v)


def test_the_transient_of_a_capped_map_is_a_few_batches() -> None:
    """48 same-shaped 128×256 fp32 gradients (6 MiB): with a 0.25 MiB cap the map's peak stays
    within a few batches (and one table's row blocks); uncapped it is several times the whole."""
    ats = [linear(f"w{k}", 128, 256) for k in range(48)] + [Atom("emb", "embedding", (4096, 64), budget=1.0)]
    gs = grads_for(ats)
    total = sum(g.numel() * 4 for g in gs)
    cap = 2**18
    for dtype in (torch.float32, torch.bfloat16):
        _, capped = codegen.generate(ats, compile_mode="eager", compute_dtype=dtype, max_batch_bytes=cap)
        _, whole = codegen.generate(ats, compile_mode="eager", compute_dtype=dtype, max_batch_bytes=None)
        own = [g.clone() for g in gs]
        small = peak_bytes(lambda: capped(own, out=own))
        big = peak_bytes(lambda: whole([g.clone() for g in gs]))
        assert small <= 8 * cap, (dtype, small / cap)
        assert big >= total, (dtype, big / total)


def test_the_step_keeps_only_the_momentum_and_bounds_its_transient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 128), *[nn.Linear(128, 128) for _ in range(32)], nn.Linear(128, 64))
    ids = torch.randint(0, 64, (4, 8))
    params = sum(p.numel() * 4 for p in model.parameters())
    cap = 2**16  # one 128×128 fp32 gradient per batch
    opt = normgraph.compile(model, (ids,), compile_mode="eager", max_batch_bytes=cap)

    def backward() -> None:
        opt.zero_grad()
        model(ids).logsumexp(-1).mean().backward()

    backward()
    first = peak_bytes(opt.step)  # allocates the momentum buffers
    backward()
    second = peak_bytes(opt.step)
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                if isinstance(t, torch.Tensor))
    assert state == params + 64 * 4  # one momentum buffer per parameter, one float per table row
    # fp32 (pinned by conftest), square matrices in the direct form: about 7 batches' worth of work
    # tensors (X, X·Xᵀ, the polynomial, products); the whole map at once would be ~7× all of it
    assert second <= 8 * cap, second / cap
    assert first <= state + 8 * cap, (first - state) / cap
    assert 8 * cap < params / 2
    # without reuse the step holds a copy of every direction and every update
    keep = normgraph.compile(model, (ids,), compile_mode="eager", max_batch_bytes=cap, reuse_grads=False)
    opt.zero_grad()
    model(ids).logsumexp(-1).mean().backward()
    keep.step()
    model(ids).logsumexp(-1).mean().backward()
    assert peak_bytes(keep.step) >= 2 * params


def test_reusing_the_gradients_gives_the_same_step_and_leaves_the_update_in_grad() -> None:
    def run(reuse: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 50))
        ids = torch.randint(0, 50, (4, 6))
        opt = normgraph.compile(model, (ids,), compile_mode="eager", reuse_grads=reuse, max_batch_bytes=1024)
        before = grad = None
        for _ in range(3):
            opt.zero_grad()
            model(ids).logsumexp(-1).mean().backward()
            grad = [p.grad.clone() for p in model.parameters()]
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
        after = [p.detach().clone() for p in model.parameters()]
        moved = [(b - a) for a, b in zip(after, before)]  # lr · update (no decay here)
        return after, [p.grad for p in model.parameters()], [grad, moved]

    kept, kept_grads, (raw, _) = run(False)
    reused, reused_grads, (_, moved) = run(True)
    for a, b in zip(kept, reused):
        assert torch.equal(a, b)
    for g, r in zip(kept_grads, raw):
        assert torch.equal(g, r)  # reuse_grads=False: .grad is the gradient
    for g, m in zip(reused_grads, moved):
        torch.testing.assert_close(g * 0.25, m, atol=1e-6, rtol=1e-5)  # reuse: .grad is the update


def test_max_batch_bytes_is_validated_and_kept_in_the_options() -> None:
    for bad in (0, -1, 1.5, "big", True):
        with pytest.raises(ValueError, match="max_batch_bytes"):
            codegen.MapOptions(max_batch_bytes=bad)
    opts = codegen.MapOptions(max_batch_bytes=2**20)
    assert codegen.MapOptions.from_dict(opts.to_dict()) == opts
    assert codegen.MapOptions().max_batch_bytes == "auto"
    ats = many()
    specs = [(a.dtype, "cpu") for a in ats]
    from normgraph.codegen.emit import AUTO_BATCH_FLOOR, batch_cap
    assert batch_cap(ats, specs, codegen.MapOptions()) == AUTO_BATCH_FLOOR  # a small model: one batch per shape
    assert batch_cap(ats, specs, opts) == 2**20 and batch_cap(ats, specs, codegen.MapOptions(max_batch_bytes=None)) is None


def test_a_compiled_capped_map_runs_its_batches_in_separate_graphs() -> None:
    ats = many(n=6)
    gs = grads_for(ats)
    src, fn = codegen.generate(ats, max_batch_bytes=2 * 64 * 48 * 4, backend="eager", compile_mode="default")
    assert src.count("torch._dynamo.graph_break()") >= 3
    _, ref = codegen.generate(ats, compile_mode="eager", max_batch_bytes=None)
    own = [g.clone() for g in gs]
    for u, v in zip(ref(gs), fn(own, out=own)):
        torch.testing.assert_close(v, u, atol=1e-6, rtol=0)
    assert fn.compiled  # no fallback to eager
