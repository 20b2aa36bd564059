"""Wall-clock training comparison: normgraph vs Muon+AdamW vs AdamW on a transformers GPT-2.

    python benchmarks/gpu_train_compare.py --out OUTDIR                       # GPT-2 small on CUDA
    python benchmarks/gpu_train_compare.py --out OUTDIR --schedule time --time-budget 60
    python benchmarks/gpu_train_compare.py --out OUTDIR --runs muon:0.01,0.02,0.04 adamw:0.0006,0.002
    python benchmarks/gpu_train_compare.py --tiny --out /tmp/tiny             # CPU, seconds (the test)

Model: `transformers.GPT2LMHeadModel` built from a config (random init, nothing downloaded):
12 layers, d = 768, 12 heads, context 256, vocabulary 256 (bytes), dropout 0 by default.
Data: bytes of the Python standard library's own source (`normgraph.demo.data`). `--corpus
full` (the default) trains on every `.py` file of this install's standard library outside its
test suites (about 11 MB on CPython 3.11), less the demo's held-out files; `--corpus small`
is the demo's 430 KB. Held-out loss: `--eval-batches` fixed batches of the demo's held-out
files, after the run (not timed).

Every run starts from the same initial weights (`--seed`) and sees the same batches in the
same order. Optimizers (`--runs KIND:LR[,LR...]`, `default` = the optimizer's default lr):
  normgraph   `normgraph.compile(model, (x,))` with every default (lr 0.25, momentum 0.9,
              weight_decay "auto", the torch.compile'd bf16 map on CUDA);
              `--normgraph-compile-mode eager` skips torch.compile (the tiny mode does)
  muon        `normgraph.demo.baselines.muon_adamw`: torch.optim.Muon (momentum 0.95, Nesterov,
              no decay, torch's default lr adjustment; Newton–Schulz in bf16 on CUDA) on the 48
              hidden matrices `transformer.h.*` (GPT-2 keeps them as Conv1D, in × out), AdamW
              (`--adam-lr`, default 0.004, betas 0.9/0.95) on the embeddings, gains and biases
  adamw       AdamW (betas 0.9/0.95, no decay) on every parameter
lr schedule: linear decay to 0 over `--steps` (`--schedule steps`, the default), or over
`--time-budget` seconds of timed training (`--schedule time`: every run gets the same wall
clock and its lr reaches 0 as the time runs out). `--time-budget` also stops a steps-schedule
run early.

Timing: the forward pass runs under bf16 autocast on CUDA (`--no-autocast` turns it off; on
the CPU it is off). Before each run `--warmup` steps are taken with lr 0 on other batches
(this is where normgraph's map is torch.compile'd and where CUDA allocates), then the
initial weights are restored and every optimizer state is cleared; construction (normgraph's
analysis) and warm-up are reported as set-up, not on the clock. The clock runs from the first
timed step, with `torch.cuda.synchronize()` after every step (the step's loss is read then),
and stops for evaluation. After the run: the median optimizer `step()` alone (10 calls, on
the last gradients) and the peak `torch.cuda.max_memory_allocated` of the timed run.

Writes to `--out`: `train_compare.json` (settings, device, every step's (step, seconds,
loss) per run, summaries), `train_compare.csv` (run, kind, lr, step, seconds, loss),
`train_compare.png` (smoothed loss against seconds and against steps; needs matplotlib) and
`train_compare.md` (the summary table). All are rewritten after every run, so a run cut
short by a timeout leaves the finished ones. Time to target: the first timed second at
which the loss averaged over the trailing `--smooth` steps is at or below the target;
`--target auto` (default) is the highest final smoothed loss over the runs, the lowest
loss every run reached.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from normgraph.demo.data import HELDOUT_FILES, TRAIN_FILES, Corpus, read_bytes, stdlib_dir  # noqa: E402

KINDS = ("normgraph", "muon", "adamw")
#: The lr each optimizer gets with `KIND:default`: normgraph's compile default; Muon's usual
#: 0.02 (its best on the CPU GPT-2 runs of docs/results.md was 0.02-0.04); AdamW's usual
#: lr for a GPT-2-small-sized model, 1e-3 (the CPU runs' 0.004 was tuned at width 128).
DEFAULT_LRS = {"normgraph": None, "muon": 0.02, "adamw": 0.001}
#: Directories of the standard library that hold test suites or tools, not library source.
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages",
                       "__pycache__"})


# --- data ------------------------------------------------------------------------------------

def full_train_files(root: Path | None = None) -> list[str]:
    """Every `.py` file of the standard library outside its test suites, sorted, less the
    held-out files: a fixed list for a given install."""
    root = root or stdlib_dir()
    held = set(HELDOUT_FILES)
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or rel.as_posix() in held or not p.is_file():
            continue
        out.append(rel.as_posix())
    return sorted(out)


def load_corpus(kind: str) -> Corpus:
    if kind == "small":
        return Corpus.load()
    if kind == "full":
        return Corpus(read_bytes(full_train_files()), read_bytes(HELDOUT_FILES))
    raise ValueError(f"unknown corpus {kind!r}: 'full' or 'small'")


# --- model and optimizers --------------------------------------------------------------------

def build_model(layers: int, d: int, heads: int, block: int, dropout: float) -> torch.nn.Module:
    import transformers as T
    T.logging.set_verbosity_error()
    cfg = T.GPT2Config(n_layer=layers, n_embd=d, n_head=heads, n_positions=block, vocab_size=256,
                       bos_token_id=0, eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout,
                       attn_pdrop=dropout)
    return T.GPT2LMHeadModel(cfg)


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The 2-D weights inside GPT-2's blocks (c_attn, attn.c_proj, c_fc, mlp.c_proj per layer):
    what a Muon user hands to Muon. Embeddings, the tied head, gains and biases are not here."""
    return [p for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("transformer.h.")]


def make_optimizer(kind: str, lr: float | None, model: torch.nn.Module, example: torch.Tensor, adam_lr: float,
                   muon_momentum: float, compile_mode: str) -> Any:
    from normgraph.demo import baselines
    if kind == "normgraph":
        import normgraph
        kw: dict[str, Any] = {} if lr is None else {"lr": lr}
        if compile_mode != "default":
            kw["compile_mode"] = compile_mode
        return normgraph.compile(model, (example,), **kw)
    if kind == "muon":
        return baselines.muon_adamw(model, hidden_matrices(model), lr, adam_lr, momentum=muon_momentum)
    if kind == "adamw":
        return baselines.adamw(model.parameters(), lr)
    raise ValueError(f"unknown optimizer {kind!r}; choose from {KINDS}")


def inner_optimizers(opt: Any) -> list[torch.optim.Optimizer]:
    return list(getattr(opt, "opts", [opt]))


def reset_state(opt: Any) -> None:
    """Forget every optimizer's state (momentum, Adam moments, step counts), as if new."""
    for o in inner_optimizers(opt):
        o.state.clear()
        if hasattr(o, "skipped_steps"):
            o.skipped_steps = 0
            o.last_step_skipped = False


def parse_runs(specs: list[str]) -> list[tuple[str, float | None]]:
    """["normgraph:default", "muon:0.01,0.02"] → [("normgraph", None), ("muon", 0.01), ("muon", 0.02)]."""
    out = []
    for spec in specs:
        kind, _, lrs = spec.partition(":")
        if kind not in KINDS:
            raise SystemExit(f"--runs {spec!r}: unknown optimizer {kind!r}; choose from {KINDS}")
        for text in (lrs or "default").split(","):
            lr = DEFAULT_LRS[kind] if text == "default" else float(text)
            out.append((kind, lr))
    return out


# --- the run ---------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: torch.nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor, autocast: bool) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()  # outside autocast: the optimizers see fp32 parameters and gradients
    return loss.detach()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             autocast: bool) -> float:
    model.eval()
    total = 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).item()
    model.train()
    return total / max(1, len(batches))


def lr_factor(schedule: str, step: int, steps: int, elapsed: float, budget: float | None) -> float:
    """Linear decay to 0: over `steps` steps, or over `budget` seconds of timed training."""
    if schedule == "steps":
        return max(0.0, 1.0 - step / steps)
    if schedule == "time":
        if not budget:
            raise ValueError("--schedule time needs --time-budget")
        return max(0.0, 1.0 - elapsed / budget)
    raise ValueError(f"unknown schedule {schedule!r}")


def run_one(args: argparse.Namespace, kind: str, lr: float | None, corpus: Corpus, device: torch.device) -> dict:
    autocast = args.autocast
    torch.manual_seed(args.seed)
    model = build_model(args.layers, args.d, args.heads, args.block, args.dropout).to(device)
    model.train()
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    example = next(corpus.batches(2, args.block, seed=args.seed))[0].to(device)
    sync(device)
    t0 = time.perf_counter()
    opt = make_optimizer(kind, lr, model, example, args.adam_lr, args.muon_momentum, args.normgraph_compile_mode)
    sync(device)
    build_s = time.perf_counter() - t0
    groups = [g for o in inner_optimizers(opt) for g in o.param_groups]
    base = [g["lr"] for g in groups]
    if lr is None:  # normgraph's default: read it back for the record
        lr = base[0]

    # warm-up: lr 0 on other batches (compiles the map, warms the allocator), then undo it all
    warm = corpus.batches(args.batch, args.block, seed=args.seed + 1)
    for g in groups:
        g["lr"] = 0.0
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        x, y = (t.to(device) for t in next(warm))
        train_step(model, opt, x, y, autocast)
    sync(device)
    warmup_s = time.perf_counter() - t0
    with torch.no_grad():
        model.load_state_dict(init)
    reset_state(opt)
    opt.zero_grad(set_to_none=True)
    del init
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    data = corpus.batches(args.batch, args.block, seed=args.seed)
    steps: list[int] = []
    seconds: list[float] = []
    losses: list[float] = []
    stopped = "steps"
    elapsed = 0.0
    sync(device)
    start = time.perf_counter()
    for step in range(args.steps):
        if args.time_budget and elapsed >= args.time_budget:
            stopped = "time budget"
            break
        factor = lr_factor(args.schedule, step, args.steps, elapsed, args.time_budget)
        for g, b in zip(groups, base):
            g["lr"] = b * factor
        x, y = (t.to(device, non_blocking=True) for t in next(data))
        loss = train_step(model, opt, x, y, autocast)
        sync(device)
        elapsed = time.perf_counter() - start
        value = loss.item()
        steps.append(step)
        seconds.append(elapsed)
        losses.append(value)
        if not math.isfinite(value):
            stopped = "non-finite loss"
            break
        if args.progress and (step % args.progress == 0):
            print(f"    {kind} lr {lr:g} step {step} {elapsed:.1f}s loss {value:.4f}", flush=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    held = evaluate(model, corpus.eval_batches(args.batch, args.block, args.eval_batches), device, autocast) \
        if args.eval_batches and losses and math.isfinite(losses[-1]) else math.nan
    # the optimizer's step() alone, on the last gradients (the weights move; the run is over)
    step_ms = math.nan
    if losses and all(p.grad is not None for p in hidden_matrices(model)):
        times = []
        for _ in range(10):
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            times.append(time.perf_counter() - t0)
        step_ms = statistics.median(times) * 1e3
    tail = losses[-max(1, len(losses) // 10):]
    deltas = [b - a for a, b in zip([0.0] + seconds[:-1], seconds)]
    record = dict(kind=kind, lr=lr, label=f"{kind} lr {lr:g}", steps=steps, seconds=seconds, losses=losses,
                  stopped=stopped, build_s=build_s, warmup_s=warmup_s, warmup_steps=args.warmup,
                  timed_s=seconds[-1] if seconds else 0.0,
                  median_step_ms=statistics.median(deltas) * 1e3 if deltas else math.nan,
                  optimizer_step_ms=step_ms, peak_mem_mib=peak,
                  train_loss=sum(tail) / len(tail) if tail else math.nan, heldout_loss=held,
                  compiled=getattr(getattr(opt, "dualize", None), "compiled", None))
    del opt, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


# --- summaries -------------------------------------------------------------------------------

def smooth(losses: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` steps (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(losses):
        acc += v
        if i >= window:
            acc -= losses[i - window]
        out.append(acc / min(i + 1, window))
    return out


def time_to_target(seconds: list[float], losses: list[float], target: float, window: int) -> tuple[float, int] | None:
    """(timed seconds, step) at which the trailing-mean loss first reaches `target`, or None."""
    for i, v in enumerate(smooth(losses, window)):
        if v <= target:
            return seconds[i], i
    return None


def auto_target(runs: list[dict], window: int) -> float | None:
    """The highest final smoothed loss over the finite runs: the lowest loss every one reached."""
    finals = [smooth(r["losses"], window)[-1] for r in runs if r["losses"] and math.isfinite(r["losses"][-1])]
    return max(finals) if finals else None


def summary_table(runs: list[dict], target: float | None, window: int) -> str:
    lines = [f"target loss {target:.4f} (trailing mean over {window} steps)" if target is not None else "no target",
             "",
             "| optimizer | lr | steps | timed s | median ms/step | optimizer step() ms | set-up s (build + warm-up) "
             "| peak MiB | train loss | held-out loss | s to target | steps to target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        hit = time_to_target(r["seconds"], r["losses"], target, window) if target is not None else None
        peak = f"{r['peak_mem_mib']:.0f}" if r.get("peak_mem_mib") is not None else "—"
        lines.append(f"| {r['kind']} | {r['lr']:g} | {len(r['steps'])} | {r['timed_s']:.1f} | {r['median_step_ms']:.1f} "
                     f"| {r['optimizer_step_ms']:.2f} | {r['build_s']:.1f} + {r['warmup_s']:.1f} | {peak} "
                     f"| {r['train_loss']:.4f} | {r['heldout_loss']:.4f} "
                     f"| {f'{hit[0]:.1f}' if hit else '—'} | {hit[1] if hit else '—'} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, title: str, target: float | None, window: int) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for r in runs:
        if not r["losses"]:
            continue
        sm = smooth(r["losses"], window)
        ax_t.plot(r["seconds"], sm, label=r["label"])
        ax_s.plot(r["steps"], sm, label=r["label"])
    for ax, xlabel in ((ax_t, "timed wall-clock seconds (set-up excluded)"), (ax_s, "step")):
        if target is not None:
            ax.axhline(target, color="black", ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    finite = [v for r in runs for v in smooth(r["losses"], window) if math.isfinite(v)]
    if finite:
        lo = min(finite)
        ax_t.set_ylim(lo - 0.05 * abs(lo), min(max(finite), lo + 3.0))
    ax_t.set_ylabel(f"train loss (nats/byte, trailing mean of {window})")
    ax_s.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(out: Path, meta: dict, runs: list[dict], args: argparse.Namespace) -> str:
    target = args.target if args.target is not None else auto_target(runs, args.smooth)
    table = summary_table(runs, target, args.smooth)
    for r in runs:
        hit = time_to_target(r["seconds"], r["losses"], target, args.smooth) if target is not None else None
        r["time_to_target_s"], r["steps_to_target"] = (hit if hit else (None, None))
    (out / "train_compare.json").write_text(json.dumps(dict(meta=meta, target=target, runs=runs), indent=1,
                                                       default=float))
    with open(out / "train_compare.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "kind", "lr", "step", "seconds", "loss"])
        for r in runs:
            for s, t, v in zip(r["steps"], r["seconds"], r["losses"]):
                w.writerow([r["label"], r["kind"], r["lr"], s, f"{t:.4f}", f"{v:.5f}"])
    (out / "train_compare.md").write_text(f"{meta['header']}\n\n{table}\n")
    if not args.no_plot:
        plot(runs, out / "train_compare.png", meta["header"], target, args.smooth)
    return table


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {torch.get_num_threads()} threads"
    except OSError:
        pass
    return platform.processor() or "cpu"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for the JSON, CSV, PNG and summary")
    p.add_argument("--runs", nargs="+", default=["normgraph:default", "muon:default", "adamw:default"],
                   help="KIND:LR[,LR...] with KIND in normgraph, muon, adamw ('default': the optimizer's default lr)")
    p.add_argument("--steps", type=int, default=None, help="default 2000 (tiny: 12)")
    p.add_argument("--time-budget", type=float, default=None, help="timed seconds per run (stops it)")
    p.add_argument("--schedule", choices=("steps", "time"), default="steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--heads", type=int, default=None, help="default d // 64")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=3, help="untimed lr-0 steps before each run (then undone)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adam-lr", type=float, default=0.004, help="AdamW's lr for Muon's non-matrix parameters")
    p.add_argument("--muon-momentum", type=float, default=0.95)
    p.add_argument("--normgraph-compile-mode", default="default", help="normgraph's compile_mode (default: torch.compile)")
    p.add_argument("--corpus", choices=("full", "small"), default="full")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--smooth", type=int, default=20, help="trailing-mean window for the plot and time to target")
    p.add_argument("--target", type=float, default=None, help="target train loss (default: auto)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-autocast", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--progress", type=int, default=0, help="print every N steps (0: only the summaries)")
    p.add_argument("--tiny", action="store_true",
                   help="2 layers, d 64, context 32, batch 8, 12 steps, CPU, eager map, small corpus (tests)")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.d, args.heads, args.block, args.batch = 2, 64, 2, 32, 8
        args.steps = args.steps or 12
        args.warmup, args.eval_batches, args.smooth = 1, 2, 3
        args.device, args.normgraph_compile_mode, args.corpus = "cpu", "eager", "small"
    args.steps = args.steps or 2000
    args.heads = args.heads or max(1, args.d // 64)
    args.autocast = torch.device(args.device).type == "cuda" and not args.no_autocast
    if args.schedule == "time" and not args.time_budget:
        p.error("--schedule time needs --time-budget")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*TF32.*")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    runs_wanted = parse_runs(args.runs)
    corpus = load_corpus(args.corpus)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    budget = f", time budget {args.time_budget:g} s per run" if args.time_budget else ""
    header = (f"GPT-2 {args.layers} layers d={args.d} heads={args.heads} context {args.block}, batch {args.batch}, "
              f"{'bf16 autocast' if args.autocast else 'fp32'}, {args.steps} steps max{budget}, lr decay over "
              f"{args.schedule}; {device_name(device)}; torch {torch.__version__}; {date}")
    meta = dict(header=header, argv=sys.argv[1:] if argv is None else list(argv), device=device_name(device),
                torch=torch.__version__, python=platform.python_version(), date=date,
                corpus=dict(kind=args.corpus, dir=str(stdlib_dir()), train_bytes=len(corpus.train),
                            heldout_bytes=len(corpus.heldout),
                            files=len(TRAIN_FILES) if args.corpus == "small" else len(full_train_files())),
                settings={k: v for k, v in vars(args).items() if k != "runs"}, runs=args.runs)
    print(f"# {header}", flush=True)
    print(f"# corpus {args.corpus}: {len(corpus.train):,} train bytes, {len(corpus.heldout):,} held-out bytes "
          f"(Python {platform.python_version()}, {stdlib_dir()})", flush=True)
    runs: list[dict] = []
    table = ""
    for kind, lr in runs_wanted:
        rec = run_one(args, kind, lr, corpus, device)
        runs.append(rec)
        print(f"  {rec['label']}: {len(rec['steps'])} steps in {rec['timed_s']:.1f} s ({rec['stopped']}), "
              f"train {rec['train_loss']:.4f}, held-out {rec['heldout_loss']:.4f}, "
              f"set-up {rec['build_s']:.1f} + {rec['warmup_s']:.1f} s"
              + ("" if rec["compiled"] is None else f", map compiled: {rec['compiled']}"), flush=True)
        table = write_outputs(out, meta, runs, args)
    print(table, flush=True)
    print(f"# wrote {out}/train_compare.{{json,csv,md{'' if args.no_plot else ',png'}}}", flush=True)
    return dict(meta=meta, runs=runs)


if __name__ == "__main__":
    main()
