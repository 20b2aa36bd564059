"""`normgraph demo`: normgraph vs AdamW vs Muon+AdamW on a small byte-level GPT.

Every optimizer gets the same model init (same seed), the same batches in the same
order, the same number of steps and the same schedule (linear decay to zero); only the
optimizer and its learning rate differ. The learning rates are the best of the sweep
recorded in docs/results.md (`normgraph demo --sweep` reruns it).

The training loop lives here (not in examples/) because examples/ and the tests reuse it.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import api
from ..codegen import orthogonalizers
from . import baselines
from .baselines import MultiOptimizer
from .data import Corpus
from .models import GPT, GPTConfig, loss_fn

#: Best learning rate of each optimizer in the sweep recorded in docs/results.md.
DEFAULT_LRS: dict[str, float] = {"normgraph": 0.25, "adamw": 4e-3, "muon": 0.04}
#: Learning-rate grids swept by `--sweep` (and recorded in docs/results.md).
SWEEP_LRS: dict[str, tuple[float, ...]] = {
    "normgraph": (0.0625, 0.125, 0.25, 0.5, 1.0),
    "adamw": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
    "muon": (0.01, 0.02, 0.04, 0.08, 0.16),
}
OPTIMIZERS = ("normgraph", "adamw", "muon")


@dataclass
class RunResult:
    name: str
    lr: float
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    train_loss: float = math.nan  # mean of the last 10% of steps (smooths batch noise)
    heldout_loss: float = math.nan
    seconds: float = 0.0
    dtype: str = "fp32"  # the dtype the optimizer orthogonalized in ("-": it does not orthogonalize)


def make_optimizer(name: str, model: torch.nn.Module, lr: float, example: torch.Tensor,
                   adam_lr: float | None = None, **kwargs) -> torch.optim.Optimizer | MultiOptimizer:
    """Build optimizer `name` for `model`; `example` is an input batch for normgraph's trace.

    For "muon", `lr` is Muon's (2-D weights inside the blocks) and `adam_lr` AdamW's
    (embeddings, head, norms); it defaults to the AdamW lr in `DEFAULT_LRS`.
    """
    if name == "normgraph":
        # torch.compile of the map costs more (tens of seconds on CPU) than it saves in a
        # run this short; pass compile_mode="default" for long runs.
        kwargs.setdefault("compile_mode", "eager")
        return api.compile(model, (example,), lr=lr, **kwargs)
    if name == "adamw":
        return baselines.adamw(model.parameters(), lr)
    if name == "muon":  # torch.optim.Muon, its Newton–Schulz in the machine's fast dtype (baselines.muon_dtype)
        hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and ".blocks." in f".{n}"]
        return baselines.muon_adamw(model, hidden, lr, adam_lr or DEFAULT_LRS["adamw"])
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss over fixed batches."""
    model.eval()
    dev = next(model.parameters()).device
    total = sum(loss_fn(model(x.to(dev)), y.to(dev)).item() for x, y in batches)
    model.train()
    return total / len(batches)


def train(name: str, lr: float, cfg: GPTConfig, corpus: Corpus, steps: int, batch_size: int,
          seed: int = 0, device: str = "cpu", heldout_batches: int = 8, progress: bool = True,
          log_every: int = 1, **opt_kwargs) -> RunResult:
    """Train a fresh `GPT(cfg)` (init from `seed`) with optimizer `name`; return its curve."""
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    data = corpus.batches(batch_size, cfg.block_size, seed=seed)
    first = next(corpus.batches(batch_size, cfg.block_size, seed=seed))[0].to(device)
    start = time.perf_counter()
    opt = make_optimizer(name, model, lr, first, **opt_kwargs)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    result = RunResult(name, lr, dtype=orthogonalization_dtype(opt, device))
    bar = _progress(steps, f"{name} lr={lr:g}", progress)
    tail: list[float] = []
    for step in range(steps):
        for g in opt.param_groups:  # linear decay to zero, identical for all optimizers
            g["lr"] = g["base_lr"] * (1 - step / steps)
        x, y = (t.to(device) for t in next(data))
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            result.steps.append(step)
            result.losses.append(value)
            break
        if step % log_every == 0 or step == steps - 1:
            result.steps.append(step)
            result.losses.append(value)
        if step >= steps - max(1, steps // 10):
            tail.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}")
    bar.close()
    result.seconds = time.perf_counter() - start
    result.train_loss = sum(tail) / len(tail) if tail else math.nan
    if heldout_batches and tail:
        result.heldout_loss = evaluate(model, corpus.eval_batches(batch_size, cfg.block_size,
                                                                  heldout_batches))
    return result


def orthogonalization_dtype(opt, device: str | torch.device) -> str:
    """The dtype `opt` orthogonalizes in: normgraph's map options (or the device default),
    the baseline Muon's `ns_dtype`; "-" for an optimizer that does not orthogonalize."""
    names = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16", torch.float64: "fp64"}
    if isinstance(opt, MultiOptimizer):
        dtype = opt.ns_dtype
    elif hasattr(opt, "map_options"):
        dtype = opt.map_options.dtype or orthogonalizers.compute_dtype(torch.device(device))
    else:
        return "-"
    return names.get(dtype, str(dtype).replace("torch.", "")) if dtype is not None else "-"


def machine_line(device: str) -> str:
    """What the timings depend on: the CPU's vector capability and whether it multiplies bf16
    natively (without it bf16 is emulated and each optimizer here orthogonalizes in fp32)."""
    if torch.device(device).type == "cuda":
        return f"device: {torch.cuda.get_device_name(torch.device(device))}"
    cap = torch.backends.cpu.get_cpu_capability()
    bf16 = orthogonalizers.cpu_has_fast_bf16()
    return (f"cpu: {cap}, native bf16 {'yes' if bf16 else 'no'} (orthogonalization in "
            f"{'bf16' if bf16 else 'fp32'}; NORMGRAPH_CPU_BF16=0/1 overrides)")


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: fall back to a silent counter
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n: int) -> None: ...
            def set_postfix(self, **kw) -> None: ...
            def close(self) -> None: ...
        return _Null()
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


def results_table(results: Sequence[RunResult]) -> str:
    """Markdown table of final train loss, held-out loss and wall time."""
    lines = ["| optimizer | lr | orthogonalizes in | train loss | held-out loss | wall time (s) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.lr:g} | {r.dtype} | {r.train_loss:.3f} | {r.heldout_loss:.3f} "
                     f"| {r.seconds:.1f} |")
    return "\n".join(lines)


def plot_curves(results: Sequence[RunResult], path: Path, title: str = "") -> Path | None:
    """Loss-vs-step PNG (smoothed); None if matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(r.steps, _smooth(r.losses), label=f"{r.name} (lr {r.lr:g})")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/byte, smoothed)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _nan_last(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _smooth(xs: Sequence[float], beta: float = 0.9) -> list[float]:
    out, avg = [], None
    for i, x in enumerate(xs):
        avg = x if avg is None else beta * avg + (1 - beta) * x
        out.append(avg)
    return out


def _opt_kwargs(name: str, args: argparse.Namespace) -> dict:
    if name == "muon":
        return {"adam_lr": args.lr_adamw}
    out: dict = {}
    if name == "normgraph" and args.compile:
        out["compile_mode"] = "default"
    if name == "normgraph" and args.masses:
        out["masses"] = {k: float(v) for k, v in (kv.split("=") for kv in args.masses.split(","))}
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="normgraph demo", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help="comma-separated subset of " + ",".join(OPTIMIZERS))
    for name in OPTIMIZERS:
        p.add_argument(f"--lr-{name}", type=float, default=DEFAULT_LRS[name])
    p.add_argument("--sweep", action="store_true",
                   help="sweep each optimizer's lr over SWEEP_LRS and print the table")
    p.add_argument("--sweep-lrs", default="", help="comma-separated lrs overriding SWEEP_LRS")
    p.add_argument("--out", default="normgraph-demo.png", help="loss-curve PNG path")
    p.add_argument("--masses", default="",
                   help="normgraph masses by module prefix, e.g. 'wte=2,wpe=2' (see docs/concepts.md)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile normgraph's duality map (pays off only in long runs)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tiny", action="store_true",
                   help="d_model 32, 1 layer, block 16, batch 4 (for tests)")
    args = p.parse_args(argv)
    if args.tiny:
        args.d_model, args.n_layer, args.n_head, args.block_size, args.batch_size = 32, 1, 2, 16, 4
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                    d_model=args.d_model)
    corpus = Corpus.load()
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    run: Callable[[str, float], RunResult] = lambda name, lr: train(
        name, lr, cfg, corpus, args.steps, args.batch_size, seed=args.seed, device=args.device,
        progress=not args.no_progress, **_opt_kwargs(name, args))
    print(f"byte-level GPT: d_model={cfg.d_model} n_layer={cfg.n_layer} n_head={cfg.n_head} "
          f"block={cfg.block_size} batch={args.batch_size} steps={args.steps} "
          f"device={args.device} threads={torch.get_num_threads()}")
    print(f"train: {len(corpus.train):,} bytes of stdlib source; held-out: "
          f"{len(corpus.heldout):,} bytes of other stdlib files")
    print(machine_line(args.device))
    if args.sweep:
        grid = {n: [float(v) for v in args.sweep_lrs.split(",")] if args.sweep_lrs else SWEEP_LRS[n]
                for n in names}
        results = [run(n, lr) for n in names for lr in grid[n]]
        print(results_table(results))
        for n in names:
            best = min((r for r in results if r.name == n), key=lambda r: _nan_last(r.train_loss))
            print(f"best {n}: lr {best.lr:g} (train loss {best.train_loss:.3f})")
        return 0
    results = [run(n, getattr(args, f"lr_{n}")) for n in names]
    print(results_table(results))
    png = plot_curves(results, Path(args.out),
                      f"byte-level GPT on stdlib source ({args.device})")
    print(f"loss curves: {png.resolve()}" if png else "loss curves: (matplotlib not installed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
