"""Diagnostic probes on the zoo's protocol: which atoms does the default starve?

Two probes, each a normgraph run of `zoo.train_one` (same data, steps and schedule) with the
param groups' lrs changed on top of the default's budgets. Neither is part of normgraph.

    # each atom's lr adapted online by how well its last update lines up with the next gradient
    python benchmarks/zoo_probes.py adapt --beta 0.1 [--matrices] FAMILY ...
    # the atoms whose names match a regex at FACTOR × their lr
    python benchmarks/zoo_probes.py scale PATTERN FACTOR FAMILY ...

`adapt` is hypergradient descent on log-lr, one per atom: before step t it reads
h = cos(g_t, u_{t-1}), the cosine between this step's gradient and the last applied update
(as W_{t-1} − W_t), and multiplies the atom's lr factor by exp(β·h), kept in [1/8, 8]. A
positive h says the last step was too short along its own direction. It keeps a copy of
every parameter, so it is a probe, not an optimizer. `--matrices` adapts only tensors of
2 or more dims. It prints each family's losses and, with `--show`, every atom's final factor:
the atoms it pushes to the cap are the ones the default starves (docs/results.md §20.7).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
import multiprocessing as mp
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402

_MAKE = zoo.make_optimizer


class AdaptedLrs:
    """Wraps a normgraph optimizer; each param group's lr is multiplied by a factor that
    follows the hypergradient's sign (see the module docstring)."""

    def __init__(self, opt: torch.optim.Optimizer, beta: float, matrices_only: bool, cap: float = 8.0) -> None:
        self.opt, self.beta, self.matrices_only, self.cap = opt, beta, matrices_only, cap
        self.param_groups = opt.param_groups
        self.factor = {g["name"]: 1.0 for g in opt.param_groups}
        self._last: dict[str, torch.Tensor] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for g in self.opt.param_groups:
            p, name = g["params"][0], g["name"]
            if p.grad is None or (self.matrices_only and p.ndim < 2) or name not in self._last:
                continue
            update = self._last[name] - p
            cos = float((p.grad * update).sum()) / (float(p.grad.norm() * update.norm()) + 1e-30)
            self.factor[name] = min(self.cap, max(1 / self.cap, self.factor[name] * math.exp(self.beta * cos)))
        lrs = [g["lr"] for g in self.opt.param_groups]
        for g in self.opt.param_groups:
            g["lr"] *= self.factor[g["name"]]
            if g["params"][0].grad is not None:
                self._last[g["name"]] = g["params"][0].detach().clone()
        self.opt.step()
        for g, lr in zip(self.opt.param_groups, lrs):
            g["lr"] = lr


def _probe(fam: str, how: str, arg: tuple, show: bool) -> str:
    wrapped: list[AdaptedLrs] = []

    def make(kind, lr, model, f, proto, example, options=None):
        opt = _MAKE(kind, lr, model, f, proto, example, options)
        if how == "adapt":
            wrapped.append(AdaptedLrs(opt, *arg))
            return wrapped[-1]
        pattern, factor = arg
        hit = [g for g in opt.param_groups if re.search(pattern, g["name"])]
        if not hit:
            raise SystemExit(f"{fam}: no parameter matches {pattern!r}")
        for g in hit:
            g["lr"] *= factor
        return opt

    zoo.make_optimizer = make
    run = zoo.train_one(fam, "normgraph", 1.0, 0, zoo.Protocol())
    line = f"{fam:14s} {how} {arg}  train {run.train:.4f}  held-out {run.held:.4f}"
    if wrapped:
        factors = sorted(wrapped[-1].factor.items(), key=lambda kv: kv[1])
        line += f"  factors {factors[0][1]:.2f} … {factors[-1][1]:.2f}"
        if show:
            line += "".join(f"\n    {v:6.2f}  {n}" for n, v in factors if v != 1.0)
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="how", required=True)
    a = sub.add_parser("adapt")
    a.add_argument("--beta", type=float, default=0.1)
    a.add_argument("--matrices", action="store_true")
    a.add_argument("--show", action="store_true", help="print every atom's final factor")
    a.add_argument("families", nargs="+")
    s = sub.add_parser("scale")
    s.add_argument("pattern")
    s.add_argument("factor", type=float)
    s.add_argument("families", nargs="+")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    arg = (args.beta, args.matrices) if args.how == "adapt" else (args.pattern, args.factor)
    show = getattr(args, "show", False)
    with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        for line in pool.map(_probe, args.families, [args.how] * len(args.families),
                             [arg] * len(args.families), [show] * len(args.families)):
            print(line, flush=True)


if __name__ == "__main__":
    main()
