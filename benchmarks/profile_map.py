"""Where the duality map's time goes: a torch.profiler trace of the default map and of step().

    python benchmarks/profile_map.py --out OUTDIR [--layers 12] [--d 768] [--compile-mode default]
        [--calls 3] [--repeats 20] [--top 25] [--what map step]

The matrices are bench_dualize.py's: GPT-2's hidden matrices (per layer 3d×d, d×d, 4d×d,
d×4d; GPT-2 small is 12 layers, d=768) with random gradients, on CUDA if there is one. The
map is the generated default map (default schedule, compute dtype and form) compiled with
`--compile-mode`; step() is `NormGraphOptimizer.step()` over the same matrices with the same
map options. For each (`--what`):

  * the median wall time of one call over `--repeats` calls (synchronised), outside the profiler;
  * `--calls` calls under torch.profiler (CPU and CUDA activity, shapes and FLOPs recorded);
  * a kernel table: every GPU kernel (on a CPU: every operator, by self time) with its calls and
    time per call of the map and its share of all kernel time, each marked matmul or other;
  * a matmul table by operator and input shapes: calls, time, GFLOP and TFLOP/s (the
    profiler's FLOP count) and the fraction of the bf16 roofline (an 8192³ bf16 matmul on
    CUDA, 2048³ on a CPU, timed in the same run);
  * a summary: GPU busy time against wall time (the rest is launch gaps, host work and syncs),
    matmul kernels' time and their rate over the map's FLOPs (`normgraph.codegen.flops`), the
    other kernels' time, and the time the map's FLOPs would take at the roofline.

Before them, `gemm_rates.md`: bf16 products of the map's sizes timed alone, the m×m product
at the batch of one shape and at the batches merging shapes would give (the "fewer launches"
lever), and X·Xᵀ of the rectangular shapes.

Writes `OUTDIR/profile_<what>.md` (the tables, also printed), `OUTDIR/trace_<what>.json.gz`
(the Chrome/Perfetto trace of the profiled calls; open it at ui.perfetto.dev),
`OUTDIR/gemm_rates.md` and `OUTDIR/map_source.py` (the generated map).
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from bench_dualize import cpu_name, gpt2_matrices, matmul_tflops, sync, timeit  # noqa: E402
from normgraph import codegen  # noqa: E402
from normgraph.core import Atom, NormGraph, layout  # noqa: E402
from normgraph.optim import NormGraphOptimizer  # noqa: E402

#: GPU kernel names of matrix products: cuBLAS/cuBLASLt (xmma, nvjet, sm90_*gemm, s16816),
#: CUTLASS, and inductor's Triton matmul templates (triton_tem_*).
MATMUL_KERNEL = re.compile(r"gemm|xmma|cutlass|nvjet|triton_tem|s16816|s1688|wgmma|Kernel2", re.IGNORECASE)
#: Operators whose time is a matrix product (CPU tables, and the by-shape table everywhere).
MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm", "aten::addbmm", "aten::matmul")


def setup(layers: int, d: int, steps: int, compile_mode: str, device: torch.device, seed: int = 0):
    """(map, optimizer, gradients, map FLOPs) for GPT-2's hidden matrices, default map options."""
    torch.manual_seed(seed)
    mats = gpt2_matrices(layers, d)
    params = [torch.nn.Parameter(torch.randn(*s, device=device) * 0.02) for _, s in mats]
    for p in params:
        p.grad = torch.randn_like(p)
    atoms = [Atom(n, "linear", s, budget=1.0 / len(mats), options=layout.matrix_options([1, *s], [0, 1, 2], 1, *s))
             for n, s in mats]
    grads = [p.grad for p in params]
    specs = [codegen.spec_of(g) for g in grads]
    source, fn = codegen.generate(atoms, specs=specs, ns_steps=steps, compile_mode=compile_mode)
    opt = NormGraphOptimizer(list(zip([n for n, _ in mats], params)), NormGraph({a.name: a for a in atoms}),
                             lr=0.02, ns_steps=steps, compile_mode=compile_mode)
    flops = codegen.flops(atoms, specs=specs, ns_steps=steps)
    return fn, opt, grads, flops, source


def profiled(fn: Callable[[], object], device: torch.device, calls: int):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    sync(device)
    with profile(activities=activities, record_shapes=True, with_flops=True) as prof:
        for _ in range(calls):
            fn()
            sync(device)
    return prof


def gpu_kernels(events) -> dict[str, tuple[int, float]]:
    """{kernel name: (launches, total µs)} over the profiler's device-side events, without the
    GPU-side copies of user annotations (record_function spans such as Optimizer.step#...)."""
    out: dict[str, tuple[int, float]] = {}
    for e in events:
        if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False) or "#" in e.name:
            continue
        n, us = out.get(e.name, (0, 0.0))
        out[e.name] = (n + 1, us + e.time_range.elapsed_us())
    return out


def cpu_operators(prof) -> dict[str, tuple[int, float]]:
    """{operator: (calls, total self µs)} on the CPU."""
    return {e.key: (e.count, e.self_cpu_time_total) for e in prof.key_averages()
            if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0}


def kernel_table(times: dict[str, tuple[int, float]], on_gpu: bool, calls: int,
                 top: int) -> tuple[list[str], float, float]:
    """Markdown rows of the top kernels (CPU: operators by self time) from {name: (count, µs)};
    returns (rows, all kernel µs per call, matmul kernel µs per call)."""
    us = {k: v[1] for k, v in times.items() if v[1] > 0}
    counts = {k: times[k][0] for k in us}
    is_mm = {k: bool(MATMUL_KERNEL.search(k)) if on_gpu else k in MATMUL_OPS for k in us}
    total = sum(us.values())
    mm = sum(v for k, v in us.items() if is_mm[k])
    what = "kernel" if on_gpu else "operator (CPU self time)"
    rows = [f"| {what} | calls per call | µs per call | share | class |", "|---|---|---|---|---|"]
    order = sorted(us, key=us.get, reverse=True)
    for key in order[:top]:
        name = key if len(key) <= 110 else key[:107] + "..."
        rows.append(f"| `{name}` | {counts[key] / calls:g} | {us[key] / calls:.1f} | {us[key] / total:.1%} "
                    f"| {'matmul' if is_mm[key] else 'other'} |")
    rest = order[top:]
    if rest:
        rows.append(f"| ({len(rest)} more) | {sum(counts[k] for k in rest) / calls:g} "
                    f"| {sum(us[k] for k in rest) / calls:.1f} | {sum(us[k] for k in rest) / total:.1%} | |")
    return rows, total / calls, mm / calls


def matmul_table(prof, device: torch.device, calls: int, roof: float) -> list[str]:
    """Matrix-product operators by input shapes: time, FLOPs, rate, roofline fraction."""
    rows = ["| operator | input shapes | calls per call | µs per call | GFLOP per call | TFLOP/s | roofline |",
            "|---|---|---|---|---|---|---|"]
    evs = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in MATMUL_OPS and e.flops]
    timed = [(e, e.device_time_total if device.type == "cuda" else e.cpu_time_total) for e in evs]
    for e, us in sorted(timed, key=lambda t: t[1], reverse=True):
        tf = e.flops / (us * 1e-6) / 1e12 if us > 0 else float("nan")
        shapes = " × ".join(str(tuple(s)) for s in e.input_shapes if s)
        rows.append(f"| {e.key} | {shapes} | {e.count / calls:g} | {us / calls:.1f} | {e.flops / calls / 1e9:.2f} "
                    f"| {tf:.4g} | {tf / roof:.1%} |")
    if len(rows) == 2:
        rows.append("| (none recorded: the products ran inside fused kernels; see the kernel table) | | | | | | |")
    return rows


def gemm_table(d: int, layers: int, device: torch.device, roof: float, repeats: int) -> list[str]:
    """bf16 products of the map's sizes timed alone: the m×m products (m = d) at the batch one
    shape gives (`layers`) and at the batches that merging the shapes with the same m would give
    (the three rectangular shapes' Gram loops: 3·layers; all four: 4·layers), and X·Xᵀ of the
    rectangular shapes. A merged batch that runs at a higher rate is the "fewer launches" lever."""
    dt = torch.bfloat16
    cases = [(f"(B, {d}, {d}) @ (B, {d}, {d})", b, d, d, d) for b in (layers, 3 * layers, 4 * layers)]
    cases += [(f"X·Xᵀ, X = (B, {d}, {n})", layers, d, n, d) for n in (3 * d, 4 * d)]
    rows = ["| product | B | µs | TFLOP/s | roofline |", "|---|---|---|---|---|"]
    for label, b, m, k, n in cases:
        a = torch.randn(b, m, k, device=device, dtype=dt)
        c = torch.randn(b, k, n, device=device, dtype=dt) if "Xᵀ" not in label else a.mT
        secs = timeit(lambda: torch.bmm(a, c), device, repeats, warmup=3)
        tf = 2 * b * m * k * n / secs / 1e12
        rows.append(f"| {label} | {b} | {secs * 1e6:.1f} | {tf:.4g} | {tf / roof:.1%} |")
    return rows


def report(what: str, fn: Callable[[], object], flops: float, device: torch.device, args: argparse.Namespace,
           roof: float, header: str, out: Path) -> str:
    wall = timeit(fn, device, args.repeats, warmup=2)
    prof = profiled(fn, device, args.calls)
    trace = out / f"trace_{what}.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    on_gpu = device.type == "cuda"
    times = gpu_kernels(prof.events()) if on_gpu else cpu_operators(prof)
    kernels, busy_us, mm_us = kernel_table(times, on_gpu, args.calls, args.top)
    wall_us = wall * 1e6
    mm_rate = flops / (mm_us * 1e-6) / 1e12 if mm_us > 0 else float("nan")
    if on_gpu:
        busy = (f"- GPU busy (sum of kernel times): {busy_us / 1e3:.3f} ms per call ({busy_us / wall_us:.1%} of wall); "
                f"the rest, {max(0.0, wall_us - busy_us) / 1e3:.3f} ms, is launch gaps, host work and syncs")
    else:  # the profiler slows CPU operators: their times are inflated, their shares are not
        busy = (f"- operator self time under the profiler (CPU; inflated by profiling, compare shares): "
                f"{busy_us / 1e3:.3f} ms per call")
    lines = [f"## {what}: {header}", "",
             f"- wall time per call (median of {args.repeats}, synchronised): {wall_us / 1e3:.3f} ms; "
             f"{flops / 1e9:.1f} GFLOP of matmul (codegen.flops) → {flops / wall / 1e12:.4g} TFLOP/s "
             f"= {flops / wall / 1e12 / roof:.1%} of the measured bf16 roofline ({roof:.4g} TFLOP/s)",
             busy,
             f"- matmul {'kernels' if device.type == 'cuda' else 'operators'}: {mm_us / 1e3:.3f} ms per call "
             f"({mm_us / max(busy_us, 1e-9):.1%} of busy), running the map's FLOPs at {mm_rate:.4g} TFLOP/s "
             f"= {mm_rate / roof:.1%} of the roofline",
             f"- other {'kernels' if device.type == 'cuda' else 'operators'}: {(busy_us - mm_us) / 1e3:.3f} ms per call",
             f"- the map's FLOPs at the roofline would take {flops / (roof * 1e12) * 1e3:.3f} ms",
             f"- trace: {trace.name}.gz ({args.calls} calls)", "",
             *kernels, "", *matmul_table(prof, device, args.calls, roof), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile-mode", default="default", help="the map's compile_mode ('eager': no torch.compile)")
    ap.add_argument("--calls", type=int, default=3, help="profiled calls")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls (default 20 on CUDA, 3 on CPU)")
    ap.add_argument("--top", type=int, default=25, help="kernels listed")
    ap.add_argument("--what", nargs="+", choices=("map", "step"), default=["map", "step"])
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.repeats = args.repeats or (20 if device.type == "cuda" else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"{args.layers} layers × 4 matrices (d={args.d}), {args.steps} NS steps, default map options, "
              f"compile_mode={args.compile_mode!r}; {device} ({name}), torch {torch.__version__}, {date}")
    fn, opt, grads, flops, source = setup(args.layers, args.d, args.steps, args.compile_mode, device)
    (out / "map_source.py").write_text(source)
    roof = matmul_tflops(device, n=8192 if device.type == "cuda" else 2048)
    texts = {}
    gemms = "\n".join(["## bf16 products of the map's sizes, each timed alone (median of "
                       f"{args.repeats}): {header}", "", *gemm_table(args.d, args.layers, device, roof, args.repeats), ""])
    (out / "gemm_rates.md").write_text(gemms + "\n")
    print(gemms, flush=True)
    for what in args.what:
        call = (lambda: fn(grads)) if what == "map" else opt.step
        text = report(what, call, flops, device, args, roof, header, out)
        (out / f"profile_{what}.md").write_text(text + "\n")
        print(text, flush=True)
        texts[what] = text
    if device.type == "cuda" and not getattr(fn, "compiled", True) and args.compile_mode != "eager":
        print(f"# NOTE: the map ran EAGER: {fn.compile_error}")
    return texts


if __name__ == "__main__":
    main()
