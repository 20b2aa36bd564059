"""Time normgraph's generated duality map against torch.optim.Muon and a per-matrix loop.

    PYTHONUNBUFFERED=1 python benchmarks/bench_dualize.py [--layers 12] [--steps 5] [--repeats N]

Matrices: the hidden matrices of GPT-2 small (per layer 3d×d, d×d, 4d×d, d×4d with d=768),
as nn.Parameters with random gradients, on the current device. Every contender does the
same number of Newton–Schulz steps with the quintic coefficients. Printed side by side:
  normgraph map      the compiled generated map (stacked same-shape matrices, batched NS)
  normgraph step     NormGraphOptimizer.step(): momentum + map + weight update
  Muon.step()        torch.optim.Muon (one matrix at a time, always bf16)
  NS loop            ortho.newton_schulz on each matrix in turn (eager, direct form)
normgraph's compute dtype is the default (bf16 on CUDA, fp32 on CPU) and, on CPU, also bf16:
Muon computes in bf16 everywhere, so that row is the same-precision comparison. On CPU the
fp32 map runs in Gram form on the rectangular matrices (ns_method="auto"; same polynomial,
fewer FLOPs), and a direct-form fp32 row shows what that buys. Each row's TFLOP/s counts
the matmul FLOPs its form really does, against the bf16 matmul roofline (a big bf16 matmul
timed in this run).
"""
from __future__ import annotations

import argparse
import sys
import platform
from pathlib import Path
import time
from collections.abc import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from normgraph import codegen
from normgraph.codegen import orthogonalizers as ortho
from normgraph.core import layout
from normgraph.core import Atom, NormGraph
from normgraph.optim import NormGraphOptimizer


def gpt2_matrices(layers: int, d: int = 768) -> list[tuple[str, tuple[int, int]]]:
    shapes = {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "mlp.c_fc": (4 * d, d), "mlp.c_proj": (d, 4 * d)}
    return [(f"h.{i}.{k}.weight", s) for i in range(layers) for k, s in shapes.items()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` over `repeats` runs after `warmup` runs (seconds)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / timeit(lambda: a @ b, device, repeats, warmup=3) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 20 on CUDA, 3 on CPU)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"# device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.layers} layers × 4 matrices, {args.steps} NS steps, median of {repeats}")

    torch.manual_seed(0)
    mats = gpt2_matrices(args.layers)
    params = [torch.nn.Parameter(torch.randn(*s, device=device) * 0.02) for _, s in mats]
    for p in params:
        p.grad = torch.randn_like(p)
    atoms = [Atom(n, "linear", s, budget=1.0 / len(mats), options=layout.matrix_options([1, *s], [0, 1, 2], 1, *s))
             for n, s in mats]
    grads = [p.grad for p in params]
    specs = [codegen.spec_of(g) for g in grads]
    direct_flops = codegen.flops(atoms, specs=specs, ns_steps=args.steps, ns_method="direct")

    rows: list[tuple[str, float, float]] = []  # (label, seconds, matmul FLOPs it does)
    contenders = [(None, "auto")] + ([] if device.type == "cuda" else [(None, "direct"), (torch.bfloat16, "auto")])
    for dt, method in contenders:
        work = ortho.compute_dtype(device, dt)
        form = "Gram form" if method == "auto" and ortho.use_gram(768, 3072, work) else "direct"
        label = f"normgraph map ({work}, {form})".replace("torch.", "")
        flops = codegen.flops(atoms, specs=specs, ns_steps=args.steps, compute_dtype=dt, ns_method=method)
        _, fn = codegen.generate(atoms, specs=specs, ns_steps=args.steps, compute_dtype=dt, ns_method=method)
        t0 = time.perf_counter()
        fn(grads)
        sync(device)
        print(f"  compiled {label} in {time.perf_counter() - t0:.1f}s (first call){'' if fn.compiled else ' -- EAGER: ' + str(fn.compile_error)}")
        rows.append((label, timeit(lambda: fn(grads), device, repeats), flops))
        ng = NormGraph({a.name: a for a in atoms})
        opt = NormGraphOptimizer(list(zip([n for n, _ in mats], params)), ng, lr=0.02, ns_steps=args.steps,
                                 compute_dtype=dt, ns_method=method)
        rows.append((label.replace("map", "step()"), timeit(opt.step, device, repeats), flops))

    muon = torch.optim.Muon(params, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=args.steps)
    muon_t = timeit(muon.step, device, repeats)
    rows.append(("torch.optim.Muon.step() (bfloat16, direct)", muon_t, direct_flops))
    work = ortho.compute_dtype(device)
    rows.append((f"per-matrix NS loop ({work}, direct)".replace("torch.", ""),
                 timeit(lambda: [ortho.newton_schulz(g, args.steps, method="direct") for g in grads], device, repeats),
                 direct_flops))

    roof = matmul_tflops(device, n=8192 if device.type == "cuda" else 2048)
    print("| contender | time (ms) | Muon.step() / this | matmul TFLOP/s | roofline fraction |")
    print("|---|---|---|---|---|")
    for label, t, flops in rows:
        tf = flops / t / 1e12
        print(f"| {label} | {t * 1e3:.1f} | {muon_t / t:.2f}× | {tf:.3f} | {tf / roof:.1%} |")
    print(f"# matmul FLOPs per call: direct form {direct_flops / 1e12:.3f} TFLOP, Gram form "
          f"{codegen.flops(atoms, specs=specs, ns_steps=args.steps, compute_dtype=torch.float32, ns_method='auto') / 1e12:.3f} TFLOP"
          f"; bf16 matmul roofline measured in this run: {roof:.2f} TFLOP/s")


if __name__ == "__main__":
    main()
