"""Optimizer memory on one model: state, retained and peak-transient bytes of normgraph, AdamW
and torch.optim.Muon.

    python benchmarks/bench_memory.py [--layers 8] [--d 1024] [--intermediate 1408] [--vocab 32000]
        [--device cpu|cuda] [--max-batch-bytes auto|none|BYTES] [--optimizers normgraph,adamw,...]

Model: transformers' LlamaForCausalLM built from a config (random weights; the defaults give
133.7M parameters, 510 MiB in fp32, untied head), one batch of 1×--seq token ids. Each
optimizer runs in a fresh process (so one's freed memory cannot hide another's peak): two
steps, each after a backward pass. Columns, in MiB and as multiples of the parameters' bytes:

  state       the optimizer's state tensors after the second step
  retained    every live tensor after the second step (found by the garbage collector,
              deduplicated by storage), minus the parameters and the gradients
  peak 1      the first step's peak above the level just before it: the state it allocates
              plus its transient
  peak 2      the second step's peak above the level just before it: its transient alone
              (the state exists already)

Peaks are counted two ways on CPU: "tensors", the largest sum of live tensor bytes allocated
during the step (torch.profiler's allocation events: exact, allocator-independent), and
"RSS", the process's VmHWM above its VmRSS, reset through /proc/self/clear_refs just before
the step (the process runs with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave the
RSS). On CUDA the peak is torch.cuda.max_memory_allocated above memory_allocated, reset
before the step.

`--map N,R,C` measures the generated map alone instead: N same-shaped R×C fp32 gradients (e.g.
1024,1024,1024: 4 GiB), updates written into the gradients, with --max-batch-bytes (default
auto) and --compile-mode (with `--map-uncapped` also without a cap, which needs several times
the gradients' bytes): the cap,
the gradients' bytes and the map's peak tensor bytes above the gradients.

Optimizers: normgraph (its defaults: momentum with Nesterov, the map in batches of at most
max_batch_bytes, updates written into the gradients), normgraph with reuse_grads=False
(gradients left untouched), AdamW (torch's defaults for the device), torch.optim.Muon on every
2-D matrix with AdamW on the gains, and Muon on the hidden matrices with AdamW on the rest
(embedding, head, gains: how Muon is used).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

OPTIMIZERS = ("normgraph", "normgraph-keep-grads", "adamw", "muon-all-2d", "muon-hidden")
MIB = 2**20


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=max(64, args.seq))
    model = LlamaForCausalLM(cfg).to(args.device)
    ids = torch.randint(0, args.vocab, (1, args.seq), device=args.device)
    return model, ids


def make_optimizer(name: str, model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace):
    if name.startswith("normgraph"):
        import normgraph
        kw = {}
        if args.max_batch_bytes != "auto":
            kw["max_batch_bytes"] = None if args.max_batch_bytes == "none" else int(args.max_batch_bytes)
        if name == "normgraph-keep-grads":
            kw["reuse_grads"] = False
        return normgraph.compile(model, (ids,), compile_mode=args.compile_mode, **kw)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4)
    from normgraph.demo.baselines import MultiOptimizer
    matrices = [p for n, p in model.named_parameters() if p.ndim == 2
                and (name == "muon-all-2d" or ".layers." in n)]
    ids_ = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in ids_]
    return MultiOptimizer(torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=1e-4))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _live_storages() -> dict[int, int]:
    """data_ptr → bytes of every storage a live tensor holds (the garbage collector's view)."""
    gc.collect()
    out: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                st = obj.untyped_storage()
                out[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: BLE001 - objects that only look like tensors
            continue
    return out


def _state_bytes(opt) -> int:
    opts = getattr(opt, "opts", (opt,))
    seen: dict[int, int] = {}
    for o in opts:
        for st in o.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(seen.values())


def _tensor_peak(events) -> int:
    """The largest running sum of allocation events (bytes; frees are negative)."""
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    level = peak = 0
    for _, n in mem:
        level += n
        peak = max(peak, level)
    return peak


def measure_step(opt, device: str, profile: bool) -> dict[str, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        return {"tensors": torch.cuda.max_memory_allocated() - before, "time": time.perf_counter() - t}
    out: dict[str, float] = {}
    if profile:  # exact tensor bytes, but the profiler itself allocates: RSS is read in another step
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            opt.step()
        out["tensors"] = _tensor_peak(prof.profiler.kineto_results.events())
        return out
    gc.collect()
    rss = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t = time.perf_counter()
    opt.step()
    out["time"] = time.perf_counter() - t
    out["rss"] = _status("VmHWM") - rss
    return out


def run_one(name: str, args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    model, ids = build(args)
    opt = make_optimizer(name, model, ids, args)
    params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    result: dict[str, float] = {"params": sum(params.values())}
    on_cpu = not args.device.startswith("cuda")
    # steps: 1 and 2 measured (RSS on CPU), then on CPU 2 more under the profiler (tensor bytes);
    # step 1's "tensors" peak is read on a fresh model (the state must be allocated in it)
    plan = [("1", False), ("2", False)]
    for label, prof in plan:
        opt.zero_grad(set_to_none=True)
        model(ids).logits.float().logsumexp(-1).mean().backward()
        got = measure_step(opt, args.device, prof)
        for k, v in got.items():
            result[f"{k} {label}"] = v
    opt.zero_grad(set_to_none=True)
    model(ids).logits.float().logsumexp(-1).mean().backward()
    opt.step()  # the second step's state and retained tensors, grads still present
    grads = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    live = _live_storages()
    result["retained"] = sum(n for ptr, n in live.items() if ptr not in params and ptr not in grads)
    result["state"] = _state_bytes(opt)
    if on_cpu:  # exact tensor peaks: step 1 on a fresh copy of everything, step 2 after it
        del opt, live
        model.zero_grad(set_to_none=True)
        gc.collect()
        model2, ids2 = build(args)
        opt2 = make_optimizer(name, model2, ids2, args)
        for label in ("1", "2"):
            opt2.zero_grad(set_to_none=True)
            model2(ids2).logits.float().logsumexp(-1).mean().backward()
            result[f"tensors {label}"] = measure_step(opt2, args.device, True)["tensors"]
    return result


def map_only(args: argparse.Namespace) -> None:
    from normgraph import codegen
    from normgraph.codegen.emit import batch_cap
    from normgraph.core import Atom, layout

    torch.set_num_threads(args.threads)
    n, r, c = (int(v) for v in args.map.split(","))
    atoms = [Atom(f"w{k}", "linear", (r, c), budget=0.1, options=layout.matrix_options([1, r, c], [0, 1, 2], 1, r, c))
             for k in range(n)]
    grads = [torch.randn(r, c) for _ in range(n)]
    total = sum(g.numel() * g.element_size() for g in grads)
    print(f"# map alone: {n} × ({r}×{c}) fp32 gradients, {total / MIB:.0f} MiB; torch {torch.__version__}, "
          f"{args.threads} threads, ns_steps={args.ns_steps}, compile_mode={args.compile_mode}")
    print("| max_batch_bytes | cap (MiB) | batches of the group | peak above the gradients (tensors) |")
    print("|---|---|---|---|")
    chosen = None if args.max_batch_bytes == "none" else (
        "auto" if args.max_batch_bytes == "auto" else int(args.max_batch_bytes))
    for cap_opt in [chosen] + ([None] if args.map_uncapped and chosen is not None else []):
        opts = codegen.MapOptions(compile_mode=args.compile_mode, ns_steps=args.ns_steps, max_batch_bytes=cap_opt)
        cap = batch_cap(atoms, [("float32", "cpu")] * n, opts)
        src, fn = codegen.generate(atoms, opts)
        if args.compile_mode != "eager":  # compile first (not profiled)
            fn(grads, out=grads)
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(grads, out=grads)
        peak = _tensor_peak(prof.profiler.kineto_results.events())
        batches = src.count("o0 = ")
        cap_text = "none" if cap is None else f"{cap / MIB:.3g}"
        print(f"| {cap_opt} | {cap_text} | {batches} | {peak / MIB:.0f} MiB ({peak / total:.3f}× the gradients"
              f"{'' if cap is None else f', {peak / cap:.2f}× the cap'}) |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--compile-mode", default="eager", help="normgraph's compile_mode (default eager)")
    ap.add_argument("--max-batch-bytes", default="auto", help="auto (default), none, or a number of bytes")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--map", metavar="N,R,C", help="measure the map alone on N same-shaped R×C gradients")
    ap.add_argument("--map-uncapped", action="store_true", help="with --map: also without a cap")
    ap.add_argument("--ns-steps", type=int, default=5, help="with --map: Newton–Schulz steps")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one optimizer, print JSON
    args = ap.parse_args()
    if args.map:
        map_only(args)
        return
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    names = [n for n in args.optimizers.split(",") if n]
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        ap.error(f"unknown optimizer(s) {unknown}; choose from {OPTIMIZERS}")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    rows = {}
    for name in names:
        cmd = [sys.executable, __file__, "--one", name] + [a for a in sys.argv[1:]]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    if not rows:
        sys.exit(1)
    params = next(iter(rows.values()))["params"]
    print(f"# Llama {args.layers} layers, d={args.d}, intermediate {args.intermediate}, vocab {args.vocab}: "
          f"{params / 4 / 1e6:.1f}M parameters, {params / MIB:.0f} MiB; device {args.device}, torch "
          f"{torch.__version__}, {args.threads} threads; normgraph max_batch_bytes={args.max_batch_bytes}, "
          f"compile_mode={args.compile_mode}")
    cuda = args.device.startswith("cuda")
    cols = ["state", "retained", "tensors 1", "tensors 2"] + ([] if cuda else ["rss 1", "rss 2"])
    titles = {"tensors 1": "peak 1 (tensors)", "tensors 2": "peak 2 (tensors)", "rss 1": "peak 1 (RSS)",
              "rss 2": "peak 2 (RSS)"}
    if cuda:
        titles = {"tensors 1": "peak 1 (CUDA)", "tensors 2": "peak 2 (CUDA)"}
    print("| optimizer | " + " | ".join(titles.get(c, c) for c in cols) + " | step 2 time |")
    print("|---|" + "---|" * (len(cols) + 1))
    for name, r in rows.items():
        cells = [f"{r[c] / MIB:.0f} MiB ({r[c] / params:.2f}×)" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + f" | {r.get('time 2', float('nan')):.2f} s |")


if __name__ == "__main__":
    main()
