"""Per-step cost of NormGraphOptimizer on the demo GPT: eager vs torch.compile'd map.

    TORCH_LOGS=recompiles python benchmarks/bench_step.py [--steps 25] [--device cpu|cuda]

Prints the first (compiling) step and the median of the later ones for each compile_mode;
with TORCH_LOGS=recompiles any recompilation after the first step is logged.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
import normgraph
from normgraph.demo.models import GPT, GPTConfig, loss_fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig()).to(args.device)
    x = torch.randint(0, 256, (16, 64), device=args.device)
    print(f"# demo GPT {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params on {args.device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for mode in ("eager", "default"):
        opt = normgraph.compile(model, (x,), lr=0.5, compile_mode=mode)
        times = []
        for _ in range(args.steps):
            loss_fn(model(x), x).backward()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            opt.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            opt.zero_grad()
        later = sorted(times[1:])
        print(f"compile_mode={mode!r}: first step {times[0]:.2f} s, median later step "
              f"{later[len(later) // 2] * 1e3:.1f} ms (compiled: {opt.dualize.compiled})")


if __name__ == "__main__":
    main()
