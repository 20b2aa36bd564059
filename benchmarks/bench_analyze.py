"""Time `normgraph.analyze`: GPT-2 small, Llama at several depths, and 7B/70B-shaped Llama
configs without weights.

    python benchmarks/bench_analyze.py [--repeat 3] [--depths 12,48,96] [--big 7b,70b]

Rows:
  GPT-2 small     transformers' GPT-2 (124M parameters, 12 layers, random weights): the capture
                  (torch.export) time and the analysis time separately, against the 2 s target.
  Llama depth L   a Llama with d=64 (random weights) at each depth of --depths: graph nodes,
                  capture time, the analysis passes after it (classify, scales, downstream,
                  residual body, ...), the total, and µs per graph node (flat when the work is
                  linear in the graph).
  Llama 7b / 70b  `normgraph.hf.weightless_model` of a Llama-2-7B-shaped config (32 layers,
                  d=4096) and a 70B-shaped one (80 layers, d=8192, 8 KV heads), on the meta device,
                  each in a fresh process: build + analyse time and the process's peak RSS
                  (VmHWM, interpreter and imports included).
Best of --repeat runs for the in-process rows.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
import normgraph
from normgraph.analysis.analyze import classify, downstream
from normgraph.analysis.trace import capture

analyze_module = importlib.import_module("normgraph.analysis.analyze")  # the module (the package exports the function)

BIG = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
}


def timed_analyze(model: torch.nn.Module, args: tuple, repeat: int) -> tuple[float, float, int, normgraph.NormGraph]:
    """(best total, best capture, graph nodes, NormGraph): the capture is timed inside analyze."""
    seen: dict[str, float] = {}
    original = analyze_module.capture

    def timed(*a, **k):
        t = time.perf_counter()
        cap = original(*a, **k)
        seen["capture"] = time.perf_counter() - t
        seen["nodes"] = sum(1 for _ in cap.graph.nodes) if cap.graph is not None else 0
        return cap

    totals, captures = [], []
    analyze_module.capture = timed
    try:
        for _ in range(repeat):
            t = time.perf_counter()
            ng = normgraph.analyze(model, args)
            totals.append(time.perf_counter() - t)
            captures.append(seen["capture"])
    finally:
        analyze_module.capture = original
    return min(totals), min(captures), int(seen["nodes"]), ng


def gpt2_row(repeat: int, seq: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 layers, d = 768, 124M parameters
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (1, seq))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total, cap_time, nodes, ng = timed_analyze(model, (ids,), repeat)
    cap = capture(model, (ids,), {"use_cache": False})
    t = time.perf_counter()
    downstream(cap)
    classify(cap, trainable, "positional", True)
    passes = time.perf_counter() - t
    print(f"GPT-2 small: {n_params / 1e6:.1f}M parameters, {len(ng.atoms)} atoms, {nodes} graph nodes")
    print(f"normgraph.analyze total: {total:.2f} s (best of {repeat})  target < 2 s: "
          f"{'met' if total < 2 else 'NOT met'}")
    print(f"  capture (torch.export): {cap_time:.2f} s")
    print(f"  analysis passes (downstream + classify): {passes:.3f} s")


def depth_rows(depths: list[int], repeat: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"\n| Llama d=64, layers | graph nodes | capture (s) | analysis after capture (s) | total (s) | µs per node |")
    print("|---|---|---|---|---|---|")
    for layers in depths:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2)
        model = LlamaForCausalLM(cfg)
        ids = torch.randint(0, 256, (1, 16))
        total, cap_time, nodes, _ = timed_analyze(model, (ids,), repeat)
        print(f"| {layers} | {nodes} | {cap_time:.2f} | {total - cap_time:.3f} | {total:.2f} | "
              f"{total / nodes * 1e6:.0f} |", flush=True)


def big_child(shape: str) -> None:
    from normgraph import hf

    t = time.perf_counter()
    model = hf.weightless_model(hf.load_config(model_type="llama", overrides=BIG[shape]))
    args, kwargs = hf.example_inputs(model)
    built = time.perf_counter() - t
    ng = normgraph.analyze(model, args, kwargs)
    total = time.perf_counter() - t
    weights = [a.budget for a in ng.atoms.values() if a.dual in ("orthogonalize", "row_normalize")]
    rss = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "atoms": len(ng.atoms),
                      "every": len(ng.atoms) == sum(1 for _ in model.parameters()), "build": built,
                      "total": total, "spread": max(weights) / min(weights), "rss": rss}))


def big_rows(shapes: list[str]) -> None:
    print(f"\n| weightless Llama | parameters | atoms (every parameter) | build + analyse (s) | "
          f"matrix budget spread | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        out = subprocess.run([sys.executable, __file__, "--big-child", shape], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {shape} | failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {shape} | {r['params'] / 1e9:.2f}B | {r['atoms']} ({'yes' if r['every'] else 'NO'}) | "
              f"{r['total']:.1f} (build {r['build']:.1f}) | {r['spread']:.3g} | {r['rss'] / 2**30:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--depths", default="12,48,96", help="Llama depths (comma-separated; empty: none)")
    parser.add_argument("--big", default="7b,70b", help="weightless shapes among 7b,70b (empty: none)")
    parser.add_argument("--no-gpt2", action="store_true")
    parser.add_argument("--big-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.big_child:
        big_child(args.big_child)
        return
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    if not args.no_gpt2:
        gpt2_row(args.repeat, args.seq)
    if args.depths:
        depth_rows([int(d) for d in args.depths.split(",")], args.repeat)
    if args.big:
        big_rows([s for s in args.big.split(",") if s])


if __name__ == "__main__":
    main()
