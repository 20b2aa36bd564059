"""Time and measure normgraph's generated duality maps against torch.optim.Muon and a per-matrix loop.

    PYTHONUNBUFFERED=1 python benchmarks/bench_dualize.py [--layers 12] [--d 768] [--steps 5]
        [--repeats N] [--plot PATH]

Matrices: the hidden matrices of a GPT-2-style model (per layer 3d×d, d×d, 4d×d, d×4d; GPT-2
small is d=768, 12 layers), as nn.Parameters with random gradients, on the current device.
Every contender does `--steps` Newton–Schulz steps. Contenders, one row each:
  normgraph map      the compiled generated map (stacked same-shape matrices, batched NS), for
                     every shipped schedule and form of the "newton-schulz" orthogonalizer:
                     ns_coefficients "quintic" and "polar-express" × {float32 ns_method="auto"
                     (Gram form on the matrices with n ≥ 2m, direct on the squares), float32
                     ns_method="gram" (Gram form on every shape), float32 direct, bfloat16
                     "auto" (the default on CUDA and on CPUs with native bf16: Gram form where
                     n ≥ 2m, re-formed from X every 2 steps, direct on the squares), bfloat16
                     direct}
  normgraph step     NormGraphOptimizer.step() (momentum + map + weight update) for the default
                     schedule's auto and direct rows: same map, so same accuracy as its map row
  CUDA graphs        (CUDA only) the default map compiled with compile_mode="reduce-overhead",
                     and the functional step (momentum + map + update, no finite check)
                     captured whole in one torch.cuda.CUDAGraph and replayed
  Muon.step()        torch.optim.Muon (one matrix at a time, always bf16, quintic): the reference
  NS loop            ortho.newton_schulz on each matrix in turn (eager, direct form, quintic)

Columns:
  matmul GFLOP       matmul FLOPs of one call in the form that row really runs
                     (normgraph.codegen.flops; Muon and the NS loop: the direct quintic count)
  FLOPs / Muon       that count over Muon's
  time               median wall time of one call over --repeats runs after one warm-up
                     (the map's first, compiling call is reported separately)
  Muon time / this   > 1 means faster than torch.optim.Muon.step()
  err <family>       accuracy (the measure of docs/newton_schulz.md, "Fewer FLOPs at Muon's
                     accuracy"): for a gradient G = U diag(σ) Vᵀ (float64 SVD of the float32
                     gradient) and the orthogonalizer's output O, the worst |(Uᵀ O V)_ii − 1| over
                     the directions with σ_i ≥ 1e-3·σ_max, worst over one layer's four shapes.
                     Families: Gaussian, power-law spectrum σ_i = 1/i, log-spaced condition number
                     1e4 (random orthogonal singular vectors), at the benchmark's shapes.
  σ_max              largest singular value of any output O over the three families

How O is read, so that it is the orthogonal factor and nothing else:
  * normgraph map: the map's update for each matrix divided by its known per-atom scale
    `normgraph.codegen.dual.matrix_scale(atom)` (budget · sqrt(fan_out/fan_in)). The family
    gradient of each shape is fed to every layer (one call of the same compiled map) and the
    first layer's updates are measured.
  * Muon.step(): a fresh torch.optim.Muon on zero parameters with lr=1, momentum=0,
    nesterov=False, weight_decay=0 (so its update is exactly −adjusted_lr · NS(G)); O is
    −param / adjusted_lr with torch's default adjust_lr_fn=None ("original"):
    adjusted_lr = sqrt(max(1, rows/cols)). Where torch exposes the per-matrix function Muon
    calls (torch.optim._muon._zeropower_via_newtonschulz), O is checked against it with
    Muon's own coefficients, steps and eps (it must agree to fp32 rounding).
  * NS loop: ortho.newton_schulz's output itself.

On CPU every time is a plain wall-clock median: run with OMP_NUM_THREADS=1 (or on an idle
machine) and compare rows of one run only. `--plot PATH` writes an accuracy-versus-time
scatter (one panel per family, one point per contender; needs matplotlib).

`--quick` (the GPU check, benchmarks/gpu_check.sh) runs only the default schedule in the
device's default compute dtype: the default ("auto") map and its step(), the direct-form map,
on CUDA the two CUDA-graph rows, Muon.step() and the NS loop. `--compile-mode` sets the maps'
compile_mode (default "default"; "eager" skips torch.compile, for quick CPU runs). After the
table: on CUDA the memory of each step() row (`torch.cuda.max_memory_allocated` over its timed
calls, less what was allocated before them, and the optimizer state's size), and for every run
the issue-33 acceptance line (default map ≤ 2.0 ms, step() ≤ 2.5 ms, error at most Muon's in
every family, the map's roofline fraction). `--json PATH` writes every row's numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from normgraph import codegen
from normgraph.codegen import orthogonalizers as ortho
from normgraph.codegen.dual import matrix_scale
from normgraph.core import layout
from normgraph.core import Atom, NormGraph
from normgraph.optim import NormGraphOptimizer

FAMILIES = ("gaussian", "powerlaw", "cond1e4")
FAMILY_TITLES = {"gaussian": "Gaussian", "powerlaw": "power-law σᵢ = 1/i", "cond1e4": "condition number 1e4"}


def gpt2_matrices(layers: int, d: int = 768) -> list[tuple[str, tuple[int, int]]]:
    shapes = {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "mlp.c_fc": (4 * d, d), "mlp.c_proj": (d, 4 * d)}
    return [(f"h.{i}.{k}.weight", s) for i in range(layers) for k, s in shapes.items()]


def cpu_name() -> str:
    """The CPU model (platform.processor() is empty on many Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


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


def state_mib(opt: torch.optim.Optimizer) -> float:
    """Size of an optimizer's state tensors (momentum buffers and the like), MiB."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor)) / 2**20


def timeit_memory(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, "Memory | None"]:
    """`timeit(fn)` and, on CUDA, the peak memory its timed calls allocate beyond what was
    allocated before them (after one untimed call that creates any lazy state)."""
    if device.type != "cuda":
        return timeit(fn, device, repeats), None
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    secs = timeit(fn, device, repeats)
    peak = torch.cuda.max_memory_allocated(device)
    return secs, Memory(before / 2**20, peak / 2**20)


@dataclass
class Memory:
    before_mib: float   # allocated before the timed calls (everything the process holds)
    peak_mib: float     # torch.cuda.max_memory_allocated over the timed calls
    state_mib: float = 0.0  # the optimizer's own state (momentum buffers)

    @property
    def transient_mib(self) -> float:
        return self.peak_mib - self.before_mib


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / timeit(lambda: a @ b, device, repeats, warmup=3) / 1e12


# ---------------------------------------------------------------------------------------------
# Accuracy


def family_matrix(shape: tuple[int, int], family: str, gen: torch.Generator) -> torch.Tensor:
    """A float64 (rows × cols) matrix of one test family (random orthogonal singular vectors)."""
    m, n = shape
    if family == "gaussian":
        return torch.randn(m, n, generator=gen, dtype=torch.float64)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    if family == "powerlaw":
        s = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    elif family == "cond1e4":
        s = torch.logspace(0, -4, k, dtype=torch.float64)
    else:
        raise ValueError(f"unknown family {family!r}")
    return (u * s) @ v.T


@dataclass
class Probe:
    """One test gradient (float32, as an optimizer holds it) and its float64 SVD."""

    family: str
    G: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    keep: torch.Tensor  # σ_i ≥ 1e-3 σ_max


def probes(shapes: list[tuple[int, int]], device: torch.device, seed: int = 0) -> dict[str, list[Probe]]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[Probe]] = {}
    for fam in FAMILIES:
        out[fam] = []
        for shape in shapes:
            G = family_matrix(shape, fam, gen).float()
            u, s, vh = torch.linalg.svd(G.double(), full_matrices=False)
            out[fam].append(Probe(fam, G.to(device), u, vh.mT, s >= 1e-3 * s[0]))
    return out


def error(O: torch.Tensor, p: Probe) -> float:
    """max over kept directions of |(Uᵀ O V)_ii − 1| (inf if O is not finite)."""
    O64 = O.detach().double().cpu()
    if not torch.isfinite(O64).all():
        return math.inf
    diag = (p.U * (O64 @ p.V)).sum(0)
    return float((diag[p.keep] - 1).abs().max())


@dataclass
class Accuracy:
    err: dict[str, float] = field(default_factory=dict)
    smax: float = 0.0


def accuracy(orth: Callable[[list[torch.Tensor]], list[torch.Tensor]], fams: dict[str, list[Probe]]) -> Accuracy:
    """`orth` maps one layer's four gradients to their orthogonal factors O."""
    acc = Accuracy()
    for fam, ps in fams.items():
        outs = orth([p.G for p in ps])
        acc.err[fam] = max(error(O, p) for O, p in zip(outs, ps))
        acc.smax = max(acc.smax, *(float(torch.linalg.matrix_norm(O.detach().double().cpu(), 2)) for O in outs))
    return acc


def map_orth(fn: Callable, atoms: list[Atom], layers: int) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """The generated map on one layer's family gradients (tiled over every layer), unscaled."""
    def orth(layer_grads: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = fn(layer_grads * layers)
        return [o / matrix_scale(a) for o, a in zip(outs[:len(layer_grads)], atoms)]
    return orth


def muon_orth(steps: int) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """torch.optim.Muon.step()'s orthogonal factor, read from one step on zero parameters."""
    def orth(layer_grads: list[torch.Tensor]) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in layer_grads]
        for p, g in zip(params, layer_grads):
            p.grad = g.clone()
        opt = torch.optim.Muon(params, lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, ns_steps=steps,
                               adjust_lr_fn=None)
        opt.step()
        outs = []
        for p in params:
            rows, cols = p.shape
            outs.append(-p.detach() / math.sqrt(max(1.0, rows / cols)))  # undo adjust_lr_fn=None ("original")
        try:
            from torch.optim._muon import _zeropower_via_newtonschulz as zeropower  # private; only a cross-check
        except ImportError:
            return outs
        group = opt.param_groups[0]
        for g, o in zip(layer_grads, outs):
            ref = zeropower(g, group["ns_coefficients"], group["ns_steps"], group["eps"]).float()
            torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-6,
                                       msg="Muon.step() readout disagrees with torch's per-matrix NS")
        return outs
    return orth


# ---------------------------------------------------------------------------------------------
# CUDA graphs


def captured(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """`fn` recorded once into a torch.cuda.CUDAGraph (after warm-up on a side stream, as the
    CUDA-graph docs ask); the returned function replays it: no Python, no launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def cuda_graph_rows(atoms: list[Atom], specs: list, opts: dict, map_fn: Callable, params: list[torch.nn.Parameter],
                    grads: list[torch.Tensor], flops: float, acc: "Accuracy", device: torch.device, repeats: int,
                    label: str, short: str) -> list["Row"]:
    """The default map under compile_mode="reduce-overhead" (inductor's CUDA graphs), and the
    whole functional step (momentum + `map_fn`, the row's compiled map, + update) captured in
    one CUDA graph by hand."""
    from normgraph.optim import functional as F
    rows = []
    _, fn = codegen.generate(atoms, specs=specs, compile_mode="reduce-overhead", **opts)
    try:
        secs = timeit(lambda: fn(grads), device, repeats, warmup=3)
        rows.append(Row(label + ", compile_mode='reduce-overhead' (CUDA graphs)", short + " reduce-overhead",
                        secs, flops, acc, "map"))
    except Exception as e:  # report, do not hide: the row is missing and says why
        print(f"# reduce-overhead map failed: {type(e).__name__}: {e}", flush=True)
    work = [p.detach() for p in params]
    bufs = [torch.zeros_like(g) for g in grads]
    kw = dict(lrs=[0.02] * len(work), momenta=[0.95] * len(work), nesterovs=[True] * len(work),
              weight_decays=[0.0] * len(work))
    try:
        replay = captured(lambda: F.normgraph_step(work, grads, bufs, map_fn, **kw))
        rows.append(Row(label.replace("map", "step (momentum + map + update)") + ", one captured CUDA graph",
                        short.replace("map", "step") + " CUDA graph", timeit(replay, device, repeats), flops, acc,
                        "step"))
    except Exception as e:
        print(f"# captured step failed: {type(e).__name__}: {e}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Row:
    label: str
    short: str       # for the plot legend
    seconds: float
    flops: float
    acc: Accuracy
    kind: str        # "map", "step", "muon", "loop"
    memory: Memory | None = None  # step() and Muon.step() rows on CUDA
    default: bool = False         # the default map / its step()


def plot(rows: list[Row], path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib ({e}); install it with pip install -e '.[plots]' "
                         "or pip install matplotlib") from None
    fig, axes = plt.subplots(1, len(FAMILIES), figsize=(5.0 * len(FAMILIES), 5.2), sharex=True)
    markers = {"map": "o", "step": "s", "muon": "*", "loop": "D"}
    cmap = plt.get_cmap("tab20")
    for ax, fam in zip(axes, FAMILIES):
        for i, r in enumerate(rows):
            ax.scatter(r.seconds * 1e3, r.acc.err[fam], marker=markers[r.kind], s=220 if r.kind == "muon" else 60,
                       color="black" if r.kind == "muon" else cmap(i % 20), label=r.short, zorder=3,
                       edgecolors="black", linewidths=0.5)
        muon = [r for r in rows if r.kind == "muon"]
        if muon:
            ax.axvline(muon[0].seconds * 1e3, color="black", ls="--", lw=0.8, zorder=1)
            ax.axhline(muon[0].acc.err[fam], color="black", ls="--", lw=0.8, zorder=1)
        ax.set_xscale("log")
        ax.set_title(FAMILY_TITLES[fam] + " (lower is better)")
        ax.set_xlabel("time per call (ms, log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("error: worst |diag(UᵀOV) − 1|, σ ≥ 1e-3·σ_max")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title + "\ndashed lines: torch.optim.Muon.step() (left of / below them: faster / more accurate)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.2, 1, 0.95))
    fig.savefig(path, dpi=110)
    print(f"# wrote {path}")


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=768, help="model width (matrices 3d×d, d×d, 4d×d, d×4d per layer)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 20 on CUDA, 3 on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", metavar="PATH", default=None, help="write an accuracy-versus-time scatter (matplotlib)")
    ap.add_argument("--quick", action="store_true",
                    help="only the default schedule in the device's default dtype (auto and direct), its step(), "
                         "the CUDA-graph rows, Muon and the NS loop")
    ap.add_argument("--compile-mode", default="default", help="the maps' compile_mode ('eager': no torch.compile)")
    ap.add_argument("--json", metavar="PATH", default=None, help="write every row's numbers as JSON")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    header = (f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
              f"{args.layers} layers × 4 matrices (d={args.d}), {args.steps} NS steps, median of {repeats}"
              + (f", compile_mode={args.compile_mode!r}" if args.compile_mode != "default" else ""))
    print("# " + header)

    torch.manual_seed(args.seed)
    mats = gpt2_matrices(args.layers, args.d)
    params = [torch.nn.Parameter(torch.randn(*s, device=device) * 0.02) for _, s in mats]
    for p in params:
        p.grad = torch.randn_like(p)
    atoms = [Atom(n, "linear", s, budget=1.0 / len(mats), options=layout.matrix_options([1, *s], [0, 1, 2], 1, *s))
             for n, s in mats]
    grads = [p.grad for p in params]
    specs = [codegen.spec_of(g) for g in grads]
    direct_flops = codegen.flops(atoms, specs=specs, ns_steps=args.steps, ns_method="direct")
    fams = probes([s for _, s in mats[:4]], device, args.seed)

    rows: list[Row] = []
    default_dtype = ortho.compute_dtype(device)
    if args.quick:
        schedules = (ortho.DEFAULT_SCHEDULE,)
        forms = [(default_dtype, "auto"), (default_dtype, "direct")]
    else:
        schedules = ortho.SCHEDULES
        forms = [(torch.float32, "auto"), (torch.float32, "gram"), (torch.float32, "direct"),
                 (torch.bfloat16, "auto"), (torch.bfloat16, "direct")]
    d = args.d
    for schedule in schedules:
        for dt, method in forms:
            dname = str(dt).replace("torch.", "")
            if method == "auto":
                restart = (f" re-formed every {ortho.HALF_PRECISION_GRAM_RESTART} steps,"
                           if ortho.gram_restarts(dt, args.steps) else "")
                form = (f"Gram form where n ≥ 2m,{restart} direct on squares (auto)"
                        if ortho.use_gram(d, 4 * d, dt, steps=args.steps) else "direct (auto)")
            else:
                form = {"gram": "Gram form on every shape", "direct": "direct"}[method]
            label = f"normgraph map, {schedule}, {dname}, {form}"
            short = f"map {schedule} {dname} {method}"
            is_default = schedule == ortho.DEFAULT_SCHEDULE and dt == default_dtype and method == "auto"
            opts = dict(ns_steps=args.steps, ns_coefficients=schedule, compute_dtype=dt, ns_method=method)
            flops = codegen.flops(atoms, specs=specs, **opts)
            _, fn = codegen.generate(atoms, specs=specs, compile_mode=args.compile_mode, **opts)
            t0 = time.perf_counter()
            fn(grads)
            sync(device)
            print(f"  compiled {label} in {time.perf_counter() - t0:.1f}s (first call)"
                  f"{'' if fn.compiled or args.compile_mode == 'eager' else ' -- EAGER: ' + str(fn.compile_error)}",
                  flush=True)
            secs = timeit(lambda: fn(grads), device, repeats)
            acc = accuracy(map_orth(fn, atoms, args.layers), fams)
            rows.append(Row(label, short, secs, flops, acc, "map", default=is_default))
            if schedule == ortho.DEFAULT_SCHEDULE and method != "gram" and (method == "auto" or not args.quick):
                ng = NormGraph({a.name: a for a in atoms})
                opt = NormGraphOptimizer(list(zip([n for n, _ in mats], params)), ng, lr=0.02,
                                         compile_mode=args.compile_mode, **opts)
                step_s, mem = timeit_memory(opt.step, device, repeats)
                if mem is not None:
                    mem.state_mib = state_mib(opt)
                rows.append(Row(label.replace("map", "step()"), short.replace("map", "step()"), step_s, flops, acc,
                                "step", memory=mem, default=is_default))
                del opt
            if device.type == "cuda" and schedule == ortho.DEFAULT_SCHEDULE and dt == torch.bfloat16 and method == "auto":
                rows += cuda_graph_rows(atoms, specs, opts, fn, params, grads, flops, acc, device, repeats, label, short)

    muon = torch.optim.Muon(params, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=args.steps)
    muon_t, muon_mem = timeit_memory(muon.step, device, repeats)
    if muon_mem is not None:
        muon_mem.state_mib = state_mib(muon)
    rows.append(Row("torch.optim.Muon.step(), quintic, bfloat16, direct", "torch.optim.Muon.step()", muon_t,
                    direct_flops, accuracy(muon_orth(args.steps), fams), "muon", memory=muon_mem))
    work = ortho.compute_dtype(device)
    wname = str(work).replace("torch.", "")
    rows.append(Row(f"per-matrix NS loop, quintic, {wname}, direct", f"NS loop quintic {wname} direct",
                    timeit(lambda: [ortho.newton_schulz(g, args.steps, "quintic", method="direct") for g in grads],
                           device, repeats),
                    direct_flops,
                    accuracy(lambda gs: [ortho.newton_schulz(g, args.steps, "quintic", method="direct") for g in gs],
                             fams),
                    "loop"))

    roof = matmul_tflops(device, n=8192 if device.type == "cuda" else 2048)
    print("| contender | matmul GFLOP | FLOPs / Muon FLOPs | time (ms) | Muon time / this | err Gaussian "
          "| err power-law | err cond 1e4 | σ_max | matmul TFLOP/s | roofline fraction |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tf = r.flops / r.seconds / 1e12
        e = r.acc.err
        print(f"| {r.label} | {r.flops / 1e9:.1f} | {r.flops / direct_flops:.3f} | {r.seconds * 1e3:.1f} "
              f"| {muon_t / r.seconds:.2f}× | {e['gaussian']:.3f} | {e['powerlaw']:.3f} | {e['cond1e4']:.3f} "
              f"| {r.acc.smax:.3f} | {tf:.3f} | {tf / roof:.1%} |")
    print(f"# Muon.step() matmul FLOPs per call (direct form): {direct_flops / 1e9:.1f} GFLOP; "
          f"bf16 matmul roofline measured in this run: {roof:.3f} TFLOP/s")
    print("# err: worst |diag(UᵀOV) − 1| over σ ≥ 1e-3·σ_max, one layer's 4 shapes, O = update / known scale; "
          "step() rows run their map row's map (same accuracy)")
    mem_rows = [r for r in rows if r.memory is not None]
    if mem_rows:
        print("| step | allocated before the timed calls (MiB) | torch.cuda.max_memory_allocated during them (MiB) "
              "| transient: peak − before (MiB) | optimizer state (MiB) |")
        print("|---|---|---|---|---|")
        for r in mem_rows:
            m = r.memory
            print(f"| {r.label} | {m.before_mib:.1f} | {m.peak_mib:.1f} | {m.transient_mib:.1f} | {m.state_mib:.1f} |")
        print(f"# gradients and parameters of the {len(mats)} matrices: "
              f"{2 * sum(p.numel() * 4 for p in params) / 2**20:.1f} MiB (fp32), included in 'before'")
    else:
        print("# step() memory: measured on CUDA only (torch.cuda.max_memory_allocated)")
    print(acceptance(rows, roof))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=header, roofline_tflops=roof, direct_flops=direct_flops,
                                                   rows=[row_dict(r, roof, muon_t) for r in rows]), indent=1))
        print(f"# wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, header)
    return rows


def row_dict(r: Row, roof: float, muon_t: float) -> dict:
    tf = r.flops / r.seconds / 1e12
    out = dict(label=r.label, kind=r.kind, default=r.default, ms=r.seconds * 1e3, gflop=r.flops / 1e9,
               tflops=tf, roofline_fraction=tf / roof, muon_over_this=muon_t / r.seconds, err=r.acc.err,
               sigma_max=r.acc.smax)
    if r.memory is not None:
        out["memory_mib"] = dict(before=r.memory.before_mib, peak=r.memory.peak_mib,
                                 transient=r.memory.transient_mib, state=r.memory.state_mib)
    return out


#: Issue 33's targets for GPT-2 small's 48 hidden matrices on an H100/H200.
TARGET_MAP_MS, TARGET_STEP_MS = 2.0, 2.5


def acceptance(rows: list[Row], roof: float) -> str:
    """One line per target: the default map and its step() against issue 33's times, their
    error against Muon's in every family, and the map's roofline fraction."""
    muon = next(r for r in rows if r.kind == "muon")
    lines = [f"# acceptance (issue 33; targets are for GPT-2 small, 12 layers, d=768, on an H100/H200):"]
    for kind, target in (("map", TARGET_MAP_MS), ("step", TARGET_STEP_MS)):
        r = next((x for x in rows if x.default and x.kind == kind), None)
        if r is None:
            lines.append(f"#   default {kind}: no row")
            continue
        ms = r.seconds * 1e3
        worse = [f for f in FAMILIES if not r.acc.err[f] <= muon.acc.err[f]]
        tf = r.flops / r.seconds / 1e12
        lines.append(f"#   default {'map' if kind == 'map' else 'step()'}: {ms:.2f} ms (target ≤ {target} ms: "
                     f"{'met' if ms <= target else 'NOT met'}); error ≤ Muon's in every family: "
                     f"{'yes' if not worse else 'NO (' + ', '.join(worse) + ')'}; "
                     f"{tf:.4g} TFLOP/s = {tf / roof:.1%} of the measured bf16 roofline; "
                     f"Muon.step() / this = {muon.seconds / r.seconds:.2f}×")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
