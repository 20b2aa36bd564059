"""Time `normgraph.analyze` on GPT-2 small (124M parameters, 12 layers) on this machine.

Prints the capture (torch.export) time and the analysis time separately, best of `--repeat`
runs, against the 2 s target. Run: `python benchmarks/bench_analyze.py`.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

import normgraph
from normgraph.analysis.analyze import classify, downstream
from normgraph.analysis.trace import capture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 layers, d = 768, 124M parameters
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    totals, captures, passes = [], [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        ng = normgraph.analyze(model, (ids,))
        totals.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cap = capture(model, (ids,), {"use_cache": False})
        t1 = time.perf_counter()
        downstream(cap)
        classify(cap, trainable, "positional", True)
        passes.append(time.perf_counter() - t1)
        captures.append(t1 - t0)
    print(f"GPT-2 small: {n_params / 1e6:.1f}M parameters, {len(ng.atoms)} atoms, "
          f"{sum(1 for _ in cap.graph.nodes)} graph nodes; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"normgraph.analyze total: {min(totals):.2f} s (best of {args.repeat})  target < 2 s: "
          f"{'met' if min(totals) < 2 else 'NOT met'}")
    print(f"  capture (torch.export): {min(captures):.2f} s")
    print(f"  analysis passes (downstream + classify): {min(passes):.3f} s")


if __name__ == "__main__":
    main()
