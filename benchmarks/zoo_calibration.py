"""Would a measured calibration pick a better lr than the default? Measured on the zoo.

    python benchmarks/zoo_calibration.py            # every family, about 5 min on 2 cores

The issue behind the zoo (docs/results.md §20) suggests setting the step's overall scale at
compile time from a measurement instead of from rules. Before building that, this asks
whether any such measurement predicts where normgraph's best lr lies. For each family, at
the zoo's protocol and after 0, 10 and 30 steps of training at the default lr, it takes
normgraph's first dual step at the default lr and measures

- `same`: the step size t (a multiple of the default step) that minimises the loss along it,
  on the batch the step was computed from (a line search over t = 2^-4 … 2^4, a parabola
  through the best three in log t);
- `other`: the same line search on another batch;
- `dout`: log2 of the RMS movement of the logits per default step (central differences).

and compares each with log2 of the best lr multiple the zoo's sweep found (the cache
`benchmarks/results/zoo_runs.json`, same parabola): the correlation over the families, and how
many families a calibrated lr (the measurement plus one offset, the median over the dev and
select families) would put within 2× of their best, against the fixed default. It also reports
the ceiling of any global calibration: the zoo's bars met at each family's best swept lr.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import math
import multiprocessing as mp
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402
from zoo_families import FAMILIES  # noqa: E402

PROBE_STEPS = (0, 10, 30)
LINE = tuple(2.0 ** k for k in range(-4, 5))


def log_argmin(curve: dict[float, float]) -> float:
    """log2 of the x minimising `curve`: a parabola through the best point and its two
    neighbours in log2 x; the end point itself when the minimum is at an end."""
    xs = sorted(curve)
    i = min(range(len(xs)), key=lambda j: curve[xs[j]])
    if i in (0, len(xs) - 1):
        return math.log2(xs[i])
    (x0, x1, x2), (y0, y1, y2) = [math.log2(xs[j]) for j in (i - 1, i, i + 1)], [curve[xs[j]] for j in (i - 1, i, i + 1)]
    den = y0 - 2 * y1 + y2
    return x1 if den <= 0 else x1 + 0.5 * (x1 - x0) * (y0 - y2) / den


def probe(name: str) -> dict[int, tuple[float, float, float]]:
    """{steps trained: (same, other, dout)} for one family (see the module docstring)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    fam, proto = FAMILIES[name], zoo.Protocol()
    from normgraph.demo.data import Corpus
    corpus = None if fam.task == "vision" else Corpus.load()
    torch.manual_seed(0)
    model = fam.build(proto.layers, proto.width, proto.block)
    opt = zoo.make_optimizer("normgraph", None, model, fam, proto, zoo._example(fam, proto, corpus, 0))
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    if fam.task == "vision":
        xtr, ytr, _, _ = zoo._digits()

        def batch():
            idx = torch.randint(0, len(xtr), (proto.vision_batch,), generator=gen)
            return {"pixel_values": xtr[idx]}, ytr[idx], None
    else:
        data = corpus.batches(proto.batch, proto.block, seed=0)

        def batch():
            x, y = next(data)
            return zoo._text_inputs(fam, x, y, gen)

    def logits(b):
        return model(**b[0]).logits

    def loss(b):
        out, target, where = logits(b), b[1], b[2]
        if where is not None:
            return F.cross_entropy(out[where].float(), target[where])
        return F.cross_entropy(out.flatten(0, -2).float(), target.flatten())

    base = [g["lr"] for g in opt.param_groups]
    steps = proto.vision_steps if fam.task == "vision" else proto.steps
    done, out = 0, {}
    for target in PROBE_STEPS:
        model.train()
        for step in range(done, target):
            for g, lr in zip(opt.param_groups, base):
                g["lr"] = lr * (1 - step / steps)
            opt.zero_grad(set_to_none=True)
            loss(batch()).backward()
            opt.step()
        done = target
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr
        b, b2 = batch(), batch()
        state, w0 = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
        opt.zero_grad(set_to_none=True)
        loss(b).backward()
        opt.step()
        step_dir = [p.detach() - w for p, w in zip(params, w0)]
        opt.load_state_dict(state)

        def move(t: float) -> None:
            with torch.no_grad():
                for p, w, d in zip(params, w0, step_dir):
                    p.copy_(w + t * d)
        model.eval()
        with torch.no_grad():
            same, other = {}, {}
            for t in LINE:
                move(t)
                same[t], other[t] = loss(b).item(), loss(b2).item()
            eps = 1e-2
            move(eps)
            up = logits(b).float()
            move(-eps)
            down = logits(b).float()
        move(0.0)
        dout = ((up - down) / (2 * eps)).pow(2).mean().sqrt().item()
        out[target] = (log_argmin(same), log_argmin(other), math.log2(max(dout, 1e-30)))
    return out


def zoo_curves(cache: Path) -> dict[str, dict[float, tuple[float, float]]]:
    """normgraph's swept (train, held-out) per lr multiple, means over seeds, current source."""
    c = zoo.Cache(cache)
    fingerprint, proto, curves = zoo.normgraph_fingerprint(), zoo.Protocol(), {}
    for name, fam in FAMILIES.items():
        runs = {m: [c.get(zoo._key((name, "normgraph", m, s), proto, fingerprint)) for s in proto.seeds(fam)]
                for m in zoo.NORMGRAPH_SWEEP}
        curves[name] = {m: (statistics.fmean(r.train for r in rs), statistics.fmean(r.held for r in rs))
                        for m, rs in runs.items() if all(rs)}
    return curves


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="*", default=None)
    p.add_argument("--cache", default=str(zoo.ROOT / "benchmarks/results/zoo_runs.json"))
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    names = args.families or list(FAMILIES)
    curves = zoo_curves(Path(args.cache))
    names = [n for n in names if len(curves.get(n, {})) >= 3]
    with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        probes = dict(zip(names, pool.map(probe, names)))
    best = {n: log_argmin({m: v[0] for m, v in curves[n].items()}) for n in names}
    print("| family | split | log2 best lr × | " + " | ".join(f"{k} after {s}" for s in PROBE_STEPS
                                                          for k in ("same", "other", "dout")) + " |")
    print("|---|---|---|" + "---|" * (3 * len(PROBE_STEPS)))
    for n in names:
        cells = " | ".join(f"{v:+.2f}" for s in PROBE_STEPS for v in probes[n][s])
        print(f"| {n} | {FAMILIES[n].split} | {best[n]:+.2f} | {cells} |")
    fit = [n for n in names if FAMILIES[n].split != "holdout"]
    held = [n for n in names if FAMILIES[n].split == "holdout"]

    def within(pred: dict[str, float], group: list[str]) -> str:
        return f"{sum(abs(best[n] - pred[n]) <= 1 for n in group)}/{len(group)}"
    print(f"\nfixed default: best lr within 2× on dev+select {within(dict.fromkeys(names, 0.0), fit)}, "
          f"holdout {within(dict.fromkeys(names, 0.0), held)}")
    for s in PROBE_STEPS:
        for i, k in enumerate(("same", "other", "dout")):
            x = {n: probes[n][s][i] for n in names}
            sign = -1.0 if k == "dout" else 1.0  # a step that moves the logits more wants a smaller lr
            offset = statistics.median(best[n] - sign * x[n] for n in fit)
            pred = {n: sign * x[n] + offset for n in names}
            xs, ys = [x[n] for n in names], [best[n] for n in names]
            corr = statistics.correlation(xs, ys) if len(set(xs)) > 1 else math.nan
            print(f"{k:5s} after {s:2d} steps: correlation with the best {corr:+.2f}; calibrated lr within 2× "
                  f"on dev+select {within(pred, fit)}, holdout {within(pred, held)}")
    ceiling = []
    for n in names:
        m = min(curves[n], key=lambda m: curves[n][m][0])
        row = zoo.scores({(n, "normgraph", 1.0, s): zoo.Run(n, "normgraph", 1.0, s, *curves[n][m])
                          for s in (0,)} | _baselines(n, Path(args.cache)), [FAMILIES[n]],
                         zoo.Protocol(text_seeds=(0,), vision_seeds=(0,)))[0]
        ceiling.append(row.verdict())
    print(f"\nceiling of a global calibration (each family at its best swept lr, {len(names)} families): "
          f"at/below AdamW {sum(v['adamw'] for v in ceiling)}, within 0.02 of Muon+AdamW "
          f"{sum(v['muon_02'] for v in ceiling)}, within 0.05 {sum(v['muon_05'] for v in ceiling)}")
    return 0


def _baselines(name: str, cache: Path) -> dict:
    """The family's baseline runs as seed-0 runs of their seed means (for `zoo.scores`)."""
    c, proto, fam, out = zoo.Cache(cache), zoo.Protocol(), FAMILIES[name], {}
    for kind in ("adamw", "muon"):
        for lr in zoo.GRIDS[(kind, zoo._domain(fam))]:
            rs = [c.get(zoo._key((name, kind, lr, s), proto, "")) for s in proto.seeds(fam)]
            if all(rs):
                out[(name, kind, lr, 0)] = zoo.Run(name, kind, lr, 0, statistics.fmean(r.train for r in rs),
                                                   statistics.fmean(r.held for r in rs))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
