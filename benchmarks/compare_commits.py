"""Time the duality map and the optimizer step of two checkouts against each other, in one run.

    git archive <commit> | tar -x -C /tmp/base      # the previous commit, outside the worktree
    OMP_NUM_THREADS=1 python benchmarks/compare_commits.py --base /tmp/base [--rounds 5] [--layers 12 --d 768]

Workloads (the shapes of docs/performance.md: GPT-2 small's 48 hidden matrices, 12 layers ×
{2304×768, 768×768, 3072×768, 768×3072}, random gradients; and benchmarks/bench_step.py's demo
GPT step):
  map eager      the generated map with its defaults (compute dtype, Newton–Schulz form), eager
  map compiled   the same map through torch.compile (the first, compiling call untimed)
  step eager     NormGraphOptimizer.step() on those matrices (momentum + map + update)
  demo step      bench_step.py's demo GPT (0.86M parameters, batch 16×64), eager, one step
Each round runs every workload once per checkout, each in a fresh process, alternating which
checkout goes first, so that a busy machine's drift falls on both alike. Prints each
checkout's median over the rounds (of the per-process medians) and the ratio new / base.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = ("map eager", "map compiled", "step eager", "demo step")


def child(workload: str, layers: int, d: int, repeats: int) -> float:
    import torch
    import normgraph
    from normgraph import codegen
    from normgraph.core import Atom, layout

    torch.manual_seed(0)
    if workload == "demo step":
        from normgraph.demo.models import GPT, GPTConfig, loss_fn
        model = GPT(GPTConfig())
        x = torch.randint(0, 256, (16, 64))
        opt = normgraph.compile(model, (x,), lr=0.5, compile_mode="eager")
        times = []
        for _ in range(repeats + 1):
            loss_fn(model(x), x).backward()
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
            opt.zero_grad()
        return statistics.median(times[1:])
    shapes = [s for _ in range(layers) for s in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))]
    atoms = [Atom(f"h.{k}", "linear", s, budget=1.0 / len(shapes),
                  options=layout.matrix_options([1, *s], [0, 1, 2], 1, *s)) for k, s in enumerate(shapes)]
    grads = [torch.randn(*s) for s in shapes]
    if workload.startswith("map"):
        mode = "eager" if workload == "map eager" else "default"
        _, fn = codegen.generate(atoms, compile_mode=mode)
        fn(grads)  # warm-up (compiles)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(grads)
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    params = [torch.nn.Parameter(torch.zeros(*s)) for s in shapes]
    ng = normgraph.NormGraph({a.name: a for a in atoms})
    opt = normgraph.NormGraphOptimizer(list(zip([a.name for a in atoms], params)), ng, compile_mode="eager")
    times = []
    for _ in range(repeats + 1):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="a checkout (or `git archive` export) of the commit to compare with")
    ap.add_argument("--new", default=str(Path(__file__).resolve().parents[1]), help="default: this checkout")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per process")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.d, args.repeats)))
        return
    trees = {"base": str(Path(args.base).resolve()), "new": str(Path(args.new).resolve())}
    workloads = [w for w in args.workloads.split(",") if w]
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        order = ["base", "new"] if r % 2 == 0 else ["new", "base"]
        for w in workloads:
            for which in order:
                env = dict(os.environ, PYTHONPATH=trees[which], PYTHONWARNINGS="ignore")
                cmd = [sys.executable, __file__, "--base", args.base, "--child", w, "--layers", str(args.layers),
                       "--d", str(args.d), "--repeats", str(args.repeats)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=trees[which])
                if out.returncode != 0:
                    sys.exit(f"{which} {w} failed:\n{out.stderr[-2000:]}")
                times.setdefault((w, which), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"# round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"# base {trees['base']} vs new {trees['new']}: {args.rounds} rounds, median of {args.repeats} calls "
          f"per process; GPT-2-shaped matrices {args.layers} layers, d={args.d}")
    print("| workload | base (s) | new (s) | new / base | per-round ratios |")
    print("|---|---|---|---|---|")
    for w in workloads:
        b, n = times[(w, "base")], times[(w, "new")]
        ratios = ", ".join(f"{y / x:.2f}" for x, y in zip(b, n))
        print(f"| {w} | {statistics.median(b):.3f} | {statistics.median(n):.3f} | "
              f"{statistics.median(n) / statistics.median(b):.3f} | {ratios} |")


if __name__ == "__main__":
    main()
