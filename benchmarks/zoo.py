"""Score normgraph's default against AdamW and Muon+AdamW on a zoo of unmodified models.

    python benchmarks/zoo.py                       # the whole zoo (45 families, every optimizer)
    python benchmarks/zoo.py --split holdout       # only the held-back quarter
    python benchmarks/zoo.py --families phi bloom --no-sweep
    python benchmarks/zoo.py --split select+dev --optimizers normgraph --normgraph-sweep 0.5 1 2

On 2 cores normgraph's part of the whole zoo takes 40 min; with the baselines from scratch
the whole zoo takes about 2 hours, an estimate from measured run times (docs/results.md §20.5). `benchmarks/results/zoo_runs.json`
ships every finished run, so a change to normgraph reruns only normgraph.

Every family (benchmarks/zoo_families.py) is trained with the same data, init, steps and
schedule by each optimizer:
- normgraph: `normgraph.compile(model, example)` with nothing else set (its default lr), and,
  unless `--no-sweep`, at the default lr × ½ and 2, extended to × ¼ or 4 while its best (train
  or held-out) is at an end (is the default lr right?);
- AdamW (betas 0.9/0.95, no decay) over a grid of lrs;
- Muon+AdamW: `torch.optim.Muon` (momentum 0.95, Nesterov; its Newton–Schulz in the dtype
  this machine is fast in, `normgraph.demo.baselines`) on the hidden Linear/Conv weights,
  AdamW (0.004; vision 0.003) on the embeddings, the output head, the stem and the rest.
Each baseline's sweep starts at three lrs and is extended one grid point at a time while its
best (train or held-out) lies at an end, so every reported best is inside its sweep.

Text (causal, masked, seq2seq): 4 layers, width 128, 4 heads, batch 16×64 bytes of the
standard library's source, 150 steps, lr decayed linearly to 0; train loss = mean of the
last 15 steps; held-out loss on 8 fixed batches of other standard-library files. Masked
models see 15% of bytes replaced by byte 0 and are scored on those; encoder-decoders read
the masked text and write the original. Vision: scikit-learn's digits (8×8, last 360 images
held out), batch 64, 200 steps, seeds 0, 1 and 2 (the test loss is noisy: means are compared).

Runs are cached in `--cache` (JSON), keyed by the protocol, the optimizer, its lr, the seed
and (for normgraph) a hash of the normgraph package's source, so a change to normgraph
reruns only normgraph. Two runs go side by side (`--jobs`), one thread each.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_families import FAMILIES, SPLITS, Family  # noqa: E402

MASK_ID = 0  # byte 0 never occurs in the corpus
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Protocol:
    layers: int = 4
    width: int = 128
    block: int = 64
    batch: int = 16
    steps: int = 150
    vision_steps: int = 200
    vision_batch: int = 64
    text_seeds: tuple[int, ...] = (0,)
    vision_seeds: tuple[int, ...] = (0, 1, 2)
    adam_lr_text: float = 0.004
    adam_lr_vision: float = 0.003
    muon_momentum: float = 0.95

    def seeds(self, fam: Family) -> tuple[int, ...]:
        return self.vision_seeds if fam.task == "vision" else self.text_seeds


QUICK = Protocol(layers=2, width=32, block=16, batch=4, steps=12, vision_steps=12, vision_batch=16,
                 vision_seeds=(0,))

#: Grids each baseline's sweep may reach; it starts at the middle three ("start").
GRIDS = {
    ("adamw", "text"): (0.000125, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128),
    ("adamw", "vision"): (0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3),
    ("muon", "text"): (0.00125, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
    ("muon", "vision"): (0.00125, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
}
START = {("adamw", "text"): (0.002, 0.004, 0.008), ("adamw", "vision"): (0.001, 0.003, 0.01),
         ("muon", "text"): (0.02, 0.04, 0.08), ("muon", "vision"): (0.02, 0.04, 0.08)}
#: normgraph's sweep: multiples of its default lr. It starts at ½, 1 and 2 and reaches ¼ or 4
#: only while the best sits at an end, so "is the best within 2× of the default?" gets the
#: answer all five would give wherever the loss has one minimum in the lr, in three runs
#: where the answer is yes.
NORMGRAPH_SWEEP = (0.25, 0.5, 1.0, 2.0, 4.0)
GRIDS |= {("normgraph", d): NORMGRAPH_SWEEP for d in ("text", "vision")}
START |= {("normgraph", d): (0.5, 1.0, 2.0) for d in ("text", "vision")}


def _domain(fam: Family) -> str:
    return "vision" if fam.task == "vision" else "text"


# --- data ------------------------------------------------------------------------------------

def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    return x[:-360], y[:-360], x[-360:], y[-360:]


def _text_inputs(fam: Family, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """(kwargs for the model, targets, positions scored) for one text batch."""
    if fam.task == "causal":
        return {"input_ids": x}, y, None
    mask = torch.rand(x.shape, generator=gen) < 0.15
    masked = x.masked_fill(mask, MASK_ID)
    if fam.task == "masked":
        return {"input_ids": masked}, x, mask
    return {"input_ids": masked, "labels": x}, x, None  # seq2seq: write the original


def _text_loss(model, fam, x, y, gen) -> torch.Tensor:
    kwargs, target, where = _text_inputs(fam, x, y, gen)
    logits = model(**kwargs).logits
    if where is not None:
        return F.cross_entropy(logits[where].float(), target[where])
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def _example(fam: Family, proto: Protocol, corpus, seed: int) -> dict:
    if fam.task == "vision":
        return {"pixel_values": _digits()[0][:4]}
    x, y = next(corpus.batches(proto.batch, proto.block, seed=seed))
    kwargs, _, _ = _text_inputs(fam, x[:2], y[:2], torch.Generator().manual_seed(seed))
    if fam.task == "seq2seq":  # trace the decoder on the same shifted targets the loss uses
        kwargs = {"input_ids": kwargs["input_ids"], "labels": kwargs["labels"]}
    return kwargs


# --- optimizers ------------------------------------------------------------------------------

def muon_split(model: torch.nn.Module, fam: Family, example: dict) -> list[torch.nn.Parameter]:
    """The hidden Linear/Conv weights a Muon user hands to Muon: every nn.Linear, Conv1D and
    nn.ConvNd weight except the output head (LMs: `get_output_embeddings()`; vision: the last
    Linear run) and the stem (the first conv run on the pixels). Embedding tables, position
    tables, gains and biases are not Linear/Conv weights, so AdamW takes them."""
    from transformers.pytorch_utils import Conv1D
    kinds = (torch.nn.Linear, Conv1D, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    order: list[torch.nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m))
             for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model(**example)
    for h in hooks:
        h.remove()
    excluded: set[int] = set()
    if fam.task == "vision":
        convs = [m for m in order if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))]
        linears = [m for m in order if isinstance(m, torch.nn.Linear)]
        for m in convs[:1] + linears[-1:]:
            excluded |= {id(p) for p in m.parameters()}
    else:
        head = model.get_output_embeddings()
        if head is not None:
            excluded |= {id(p) for p in head.parameters()}
    seen: set[int] = set()
    hidden = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, kinds) and isinstance(w, torch.nn.Parameter) and w.ndim >= 2 \
                and id(w) not in excluded and id(w) not in seen and w.requires_grad:
            seen.add(id(w))
            hidden.append(w)
    return hidden


def make_optimizer(kind: str, lr: float | None, model, fam: Family, proto: Protocol, example: dict,
                   options: dict | None = None):
    from normgraph.demo import baselines
    if kind == "normgraph":
        import normgraph
        kw = {} if lr is None else {"lr": lr}
        return normgraph.compile(model, None, example, compile_mode="eager", **(options or {}), **kw)
    if kind == "adamw":
        return baselines.adamw(model.parameters(), lr)
    if kind == "muon":
        adam_lr = proto.adam_lr_vision if fam.task == "vision" else proto.adam_lr_text
        return baselines.muon_adamw(model, muon_split(model, fam, example), lr, adam_lr, proto.muon_momentum)
    raise ValueError(kind)


# --- one run ---------------------------------------------------------------------------------

@dataclass
class Run:
    family: str
    optimizer: str
    lr: float  # normgraph: the multiple of its default lr
    seed: int
    train: float = math.nan
    held: float = math.nan
    seconds: float = 0.0


def train_one(fam_name: str, kind: str, lr_mult_or_lr: float, seed: int, proto: Protocol,
              options: dict | None = None) -> Run:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    fam = FAMILIES[fam_name]
    from normgraph.demo.data import Corpus
    corpus = None if fam.task == "vision" else Corpus.load()
    torch.manual_seed(seed)
    model = fam.build(proto.layers, proto.width, proto.block)
    example = _example(fam, proto, corpus, seed)
    lr = lr_mult_or_lr
    if kind == "normgraph":
        import inspect
        import normgraph
        default = inspect.signature(normgraph.compile).parameters["lr"].default
        lr = default * lr_mult_or_lr
    opt = make_optimizer(kind, lr, model, fam, proto, example, options if kind == "normgraph" else None)
    groups = opt.param_groups
    for g in groups:
        g["base_lr"] = g["lr"]
    steps = proto.vision_steps if fam.task == "vision" else proto.steps
    gen = torch.Generator().manual_seed(seed)
    if fam.task == "vision":
        xtr, ytr, xte, yte = _digits()
    else:
        data = corpus.batches(proto.batch, proto.block, seed=seed)
    tail: list[float] = []
    start = time.perf_counter()
    out = Run(fam_name, kind, lr_mult_or_lr, seed)
    model.train()
    for step in range(steps):
        for g in groups:
            g["lr"] = g["base_lr"] * (1 - step / steps)
        if fam.task == "vision":
            idx = torch.randint(0, len(xtr), (proto.vision_batch,), generator=gen)
            loss = F.cross_entropy(model(pixel_values=xtr[idx]).logits, ytr[idx])
        else:
            x, y = next(data)
            loss = _text_loss(model, fam, x, y, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        v = loss.item()
        if not math.isfinite(v):
            out.seconds = time.perf_counter() - start
            return out  # diverged: nan losses
        if step >= steps - max(1, steps // 10):
            tail.append(v)
    model.eval()
    with torch.no_grad():
        if fam.task == "vision":
            held = F.cross_entropy(model(pixel_values=xte).logits, yte).item()
        else:
            g_eval = torch.Generator().manual_seed(1234)
            held = statistics.fmean(_text_loss(model, fam, x, y, g_eval).item()
                                    for x, y in corpus.eval_batches(proto.batch, proto.block, 8))
    out.train, out.held, out.seconds = statistics.fmean(tail), held, time.perf_counter() - start
    return out


# --- the cache and the schedule ----------------------------------------------------------------

def normgraph_fingerprint() -> str:
    h = hashlib.sha1()
    for p in sorted((ROOT / "normgraph").rglob("*.py")):
        h.update(p.relative_to(ROOT).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _key(run: tuple[str, str, float, int], proto: Protocol, fingerprint: str, options: dict | None = None) -> str:
    fam, kind, lr, seed = run
    tag = fingerprint if kind == "normgraph" else f"torch{torch.__version__}"
    if kind == "normgraph" and options:
        tag += " " + json.dumps(options, sort_keys=True, default=str)
    return json.dumps([asdict(proto), fam, kind, lr, seed, tag], sort_keys=True)


class Cache:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.runs: dict[str, dict] = {}
        if path and path.exists():
            self.runs = json.loads(path.read_text())

    def get(self, key: str) -> Run | None:
        r = self.runs.get(key)
        return Run(**r) if r else None

    def put(self, key: str, run: Run) -> None:
        self.runs[key] = asdict(run)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.runs, indent=0, sort_keys=True))
            tmp.replace(self.path)


def _mean(runs: list[Run], attr: str) -> float:
    vals = [getattr(r, attr) for r in runs]
    return statistics.fmean(vals) if all(math.isfinite(v) for v in vals) else math.inf


def _per_lr(results: dict, fam: Family, kind: str, seeds) -> dict[float, tuple[float, float]]:
    """lr -> (mean train, mean held-out) over the seeds, for the lrs every seed has run."""
    out = {}
    lrs = {lr for (f, k, lr, s) in results if f == fam.name and k == kind}
    for lr in sorted(lrs):
        runs = [results.get((fam.name, kind, lr, s)) for s in seeds]
        if all(runs):
            out[lr] = (_mean(runs, "train"), _mean(runs, "held"))
    return out


def _extensions(results: dict, fam: Family, kind: str, seeds) -> list[float]:
    """Grid points to add while a best lr (train or held-out) sits at an end of the sweep."""
    grid = GRIDS[(kind, _domain(fam))]
    per = _per_lr(results, fam, kind, seeds)
    if not per:
        return []
    lrs = sorted(per)
    add = []
    for metric in (0, 1):
        best = min(lrs, key=lambda lr: per[lr][metric])
        i = grid.index(best) if best in grid else -1
        if best == lrs[0] and i > 0 and grid[i - 1] not in per:
            add.append(grid[i - 1])
        if best == lrs[-1] and 0 <= i < len(grid) - 1 and grid[i + 1] not in per:
            add.append(grid[i + 1])
    return sorted(set(add))


def schedule(families: list[Family], proto: Protocol, kinds: tuple[str, ...], sweep: bool | tuple[float, ...]):
    """Every run to start with: normgraph at the multiples `sweep` of its default lr (True: the
    start of `NORMGRAPH_SWEEP`, extended like a baseline's; False: the default only), each
    baseline at its starting lrs."""
    multiples = (START[("normgraph", "text")] if sweep is True else (1.0,) if sweep is False
                 else tuple(sweep))
    for fam in families:
        for seed in proto.seeds(fam):
            if "normgraph" in kinds:
                for mult in multiples:
                    yield (fam.name, "normgraph", mult, seed)
            for kind in ("adamw", "muon"):
                if kind in kinds:
                    for lr in START[(kind, _domain(fam))]:
                        yield (fam.name, kind, lr, seed)


def run_all(families: list[Family], proto: Protocol, kinds: tuple[str, ...], sweep: bool | tuple[float, ...], jobs: int,
            cache: Cache, log=print, options: dict | None = None) -> dict:
    fingerprint = normgraph_fingerprint()
    results: dict[tuple, Run] = {}
    pending = list(schedule(families, proto, kinds, sweep))
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        while pending:
            todo = []
            for job in pending:
                hit = cache.get(_key(job, proto, fingerprint, options))
                if hit is not None:
                    results[job] = hit
                else:
                    todo.append(job)
            futures = {pool.submit(train_one, *job, proto, options): job for job in todo}
            for fut in cf.as_completed(futures):
                job = futures[fut]
                run = fut.result()
                results[job] = run
                cache.put(_key(job, proto, fingerprint, options), run)
                log(f"  {job[0]:14s} {job[1]:9s} lr={job[2]:<7g} seed={job[3]}  train {run.train:.4f}  "
                    f"held-out {run.held:.4f}  ({run.seconds:.0f} s)")
            pending = []
            extended = ("adamw", "muon") + (("normgraph",) if sweep is True else ())
            for fam in families:
                for kind in extended:
                    if kind in kinds:
                        seeds = proto.seeds(fam)
                        pending += [(fam.name, kind, lr, s) for lr in _extensions(results, fam, kind, seeds)
                                    for s in seeds]
    return results


# --- the table ---------------------------------------------------------------------------------

@dataclass
class Score:
    family: str
    task: str
    split: str
    normgraph: tuple[float, float]
    best_mult: float | None  # normgraph's best lr (train) as a multiple of the default
    adamw: tuple[float, float, float, float]  # best train (lr), best held-out (lr)
    muon: tuple[float, float, float, float]

    def verdict(self) -> dict[str, bool]:
        tr, he = self.normgraph
        ok = math.isfinite(tr) and math.isfinite(he)
        return {
            "adamw": ok and he <= self.adamw[2] + 1e-9 and tr <= self.adamw[0] + 0.005,
            "muon_02": ok and tr <= self.muon[0] + 0.02 and he <= self.muon[2] + 0.02,
            "muon_05": ok and tr <= self.muon[0] + 0.05 and he <= self.muon[2] + 0.05,
            "lr": self.best_mult is None or 0.5 <= self.best_mult <= 2.0,
        }


def _best(per: dict[float, tuple[float, float]]) -> tuple[float, float, float, float]:
    if not per:
        return (math.nan,) * 4
    lt = min(per, key=lambda lr: per[lr][0])
    lh = min(per, key=lambda lr: per[lr][1])
    return per[lt][0], lt, per[lh][1], lh


def scores(results: dict, families: list[Family], proto: Protocol) -> list[Score]:
    out = []
    for fam in families:
        seeds = proto.seeds(fam)
        ng = _per_lr(results, fam, "normgraph", seeds)
        default = ng.get(1.0, (math.nan, math.nan))
        best_mult = min(ng, key=lambda m: ng[m][0]) if len(ng) > 1 else None
        out.append(Score(fam.name, fam.task, fam.split, default, best_mult,
                         _best(_per_lr(results, fam, "adamw", seeds)), _best(_per_lr(results, fam, "muon", seeds))))
    return out


def table(rows: list[Score]) -> str:
    f = lambda v: "nan" if not math.isfinite(v) else f"{v:.3f}"  # noqa: E731
    lines = ["| family | task | split | normgraph default (train / held-out) | best lr × | "
             "AdamW best train (lr) / held-out (lr) | Muon+AdamW best train (lr) / held-out (lr) | "
             "vs AdamW | vs Muon (0.02) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        v = s.verdict()
        mark = lambda ok: "ok" if ok else "**no**"  # noqa: E731
        mult = "-" if s.best_mult is None else f"{s.best_mult:g}"
        lines.append(
            f"| {s.family} | {s.task} | {s.split} | {f(s.normgraph[0])} / {f(s.normgraph[1])} | {mult} | "
            f"{f(s.adamw[0])} ({s.adamw[1]:g}) / {f(s.adamw[2])} ({s.adamw[3]:g}) | "
            f"{f(s.muon[0])} ({s.muon[1]:g}) / {f(s.muon[2])} ({s.muon[3]:g}) | "
            f"{mark(v['adamw'])} | {mark(v['muon_02']) if v['muon_05'] else '**no (>0.05)**'} |")
    return "\n".join(lines)


def summary(rows: list[Score]) -> str:
    parts = []
    for split in ("all",) + SPLITS:
        sel = [s for s in rows if split == "all" or s.split == split]
        if not sel:
            continue
        v = [s.verdict() for s in sel]
        n = len(sel)
        lr_rows = [s for s in sel if s.best_mult is not None]
        parts.append(f"{split}: {n} families; at/below AdamW {sum(x['adamw'] for x in v)}/{n}; "
                     f"within 0.02 of Muon+AdamW {sum(x['muon_02'] for x in v)}/{n}, within 0.05 "
                     f"{sum(x['muon_05'] for x in v)}/{n}"
                     + (f"; best lr within 2× of the default {sum(x['lr'] for x in v if True)}/{n}"
                        if lr_rows else ""))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="*", default=None, help=f"names (default: all {len(FAMILIES)})")
    p.add_argument("--split", choices=("all",) + SPLITS + ("select+dev",), default="all")
    p.add_argument("--optimizers", nargs="*", default=["normgraph", "adamw", "muon"])
    p.add_argument("--no-sweep", action="store_true", help="normgraph at its default lr only")
    p.add_argument("--normgraph-sweep", nargs="*", type=float, default=None, metavar="MULTIPLE",
                   help="exactly these multiples of normgraph's default lr (default: ½, 1 and 2, "
                        "extended to ¼ or 4 while the best is at an end)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a tiny protocol (2 layers, width 32, 12 steps)")
    p.add_argument("--cache", default=str(ROOT / "benchmarks/results/zoo_runs.json"),
                   help="JSON file of finished runs ('' for none)")
    p.add_argument("--out", default="", help="write the table (markdown) here too")
    p.add_argument("--normgraph-option", nargs="*", default=[], metavar="NAME=VALUE",
                   help="keyword arguments for normgraph.compile (a Python literal each), to score a variant "
                        "of the default, e.g. body_decay=0.05")
    args = p.parse_args(argv)
    fams = [FAMILIES[n] for n in args.families] if args.families else list(FAMILIES.values())
    if args.split != "all":
        want = args.split.split("+")
        fams = [f for f in fams if f.split in want]
    proto = QUICK if args.quick else Protocol()
    cache = Cache(Path(args.cache) if args.cache else None)
    start = time.perf_counter()
    print(f"# zoo: {len(fams)} families, protocol {asdict(proto)}, torch {torch.__version__}, "
          f"cpu {torch.backends.cpu.get_cpu_capability()}, normgraph source {normgraph_fingerprint()}", flush=True)
    import ast
    options = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in args.normgraph_option)}
    sweep = False if args.no_sweep else tuple(args.normgraph_sweep) if args.normgraph_sweep else True
    results = run_all(fams, proto, tuple(args.optimizers), sweep, args.jobs, cache,
                      log=lambda s: print(s, flush=True), options=options or None)
    rows = scores(results, fams, proto)
    text = table(rows) + "\n\n" + summary(rows) + f"\n\n(wall time {time.perf_counter() - start:.0f} s)\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
