"""Probe where a vision model's loss gap sits: `train_vision.py`'s loop (same data, init, batches
and linear schedule) with normgraph's atoms changed after the analysis, one seed per process.

    OMP_NUM_THREADS=1 python benchmarks/vision_probe.py --model resnet --layers 8 --seed 0 \
        --late-adamw 210 --late-group kind:linear

Atoms are picked by a selector: a name substring, `kind:K` (the atom's kind), or several joined
by `&` (all must hold). The probes are diagnostics, not settings we ship:
- `--scale SEL=F` multiplies the selected atoms' budgets by F;
- `--decay SEL=V` sets their weight decay to V;
- `--kinds NAME=KIND` overrides the analysis' kind (its `kinds=`);
- `--momentum M` sets every group's momentum;
- `--power P` decays the lr as (1 − t)^P instead of linearly (P = 1);
- `--late-adamw STEP --late-group SEL[,SEL…]` hands the selected parameters to AdamW
  (lr `--adam-lr` on the same schedule, betas (0.9, 0.95), no decay) from step STEP on;
- `--curve` prints the mean train loss of each tenth of the run;
- `--head` adds to the result line how the final weights fit, in eval mode unless said: the
  classifier's spectral norm, the RMS of its input, the median margin (true logit minus the
  largest other) on train and test; on the whole train set the mean loss, the misclassified
  examples, the share of the loss its worst 1% carry, and the mean loss in batches of 64 on
  BatchNorm's batch statistics (train mode, no step).

Each run prints one `RESULT` line (train loss = mean of the last 10% of steps, as in
train_vision.py); pair them over seeds to compare (docs/results.md §18).
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_vision import MuonWithAdamW, build, digits  # noqa: E402


def selected(sel: str, name: str, kind: str) -> bool:
    """`sel` is `a&b&…`; each part is `kind:K` or a substring of the parameter's name."""
    return all(kind == part[5:] if part.startswith("kind:") else part in name for part in sel.split("&"))


def matching(atoms: dict, sel: str) -> list[str]:
    """The names of the atoms that `sel` picks, in the norm graph's order."""
    return [n for n, a in atoms.items() if selected(sel, n, a.kind)]


def pairs(items: list[str]) -> list[tuple[str, str]]:
    return [tuple(item.rsplit("=", 1)) for item in items]  # type: ignore[misc]


def head_report(model: torch.nn.Module, xtr: torch.Tensor, ytr: torch.Tensor,
                xte: torch.Tensor, yte: torch.Tensor) -> str:
    """How the final weights fit: the logits' scale (the last Linear, the classifier, and what it
    reads), the train set's loss and where it sits, and how much BatchNorm's batch statistics add."""
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    with torch.no_grad():
        margins, losses = [], []
        for x, y in ((xtr, ytr), (xte, yte)):
            logits = model(pixel_values=x).logits
            true = logits.gather(1, y[:, None]).squeeze(1)
            other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
            margins.append(true - other)
            losses.append(F.cross_entropy(logits, y, reduction="none"))
        sigma = torch.linalg.matrix_norm(head.weight, ord=2).item()
        # the same weights with BatchNorm on batch statistics, as the training batches saw them
        buffers = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))
        batch_losses = [F.cross_entropy(model(pixel_values=xtr[i]).logits, ytr[i]).item()
                        for i in order.split(64)]
        model.load_state_dict(buffers)
        model.eval()
    hook.remove()
    worst = losses[0].topk(max(1, len(losses[0]) // 100)).values.sum() / losses[0].sum()
    return (f"head sigma {sigma:.3f} input_rms {seen[0].pow(2).mean().sqrt().item():.3f} "
            f"margin_train {margins[0].median().item():.2f} margin_test {margins[1].median().item():.2f} "
            f"train_eval {losses[0].mean().item():.4f} train_errors {int((margins[0] <= 0).sum())} "
            f"worst1pct_share {worst.item():.2f} train_batchstats {sum(batch_losses) / len(batch_losses):.4f}")


class Joined:
    """Two optimizers stepped as one (normgraph for most atoms, AdamW for the handed-off ones)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts
        self.param_groups = [g for o in opts for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none)

    def step(self) -> None:
        for o in self.opts:
            o.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("vit", "resnet"), default="resnet")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--opt", choices=("normgraph", "adamw", "muon"), default="normgraph")
    p.add_argument("--lr", type=float, default=0.25)
    p.add_argument("--adam-lr", type=float, default=0.003)
    p.add_argument("--scale", nargs="*", default=[], metavar="SEL=F")
    p.add_argument("--decay", nargs="*", default=[], metavar="SEL=V")
    p.add_argument("--kinds", nargs="*", default=[], metavar="NAME=KIND")
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--power", type=float, default=1.0)
    p.add_argument("--late-adamw", type=int, default=-1, metavar="STEP")
    p.add_argument("--late-group", default="", metavar="SEL[,SEL…]")
    p.add_argument("--curve", action="store_true")
    p.add_argument("--head", action="store_true")
    args = p.parse_args()
    probes = args.scale or args.decay or args.kinds or args.momentum is not None or args.late_adamw >= 0
    if args.opt != "normgraph" and probes:
        p.error("--scale, --decay, --kinds, --momentum and --late-adamw change normgraph's atoms: use --opt normgraph")
    if (args.late_adamw >= 0) != bool(args.late_group):
        p.error("--late-adamw STEP and --late-group SEL go together")
    if args.late_adamw >= args.steps:
        p.error(f"--late-adamw {args.late_adamw} is past the last step ({args.steps - 1}): nothing would be handed off")
    warnings.filterwarnings("ignore")
    xtr, ytr, xte, yte = digits()
    torch.manual_seed(args.seed)
    model = build(args.model, args.layers, args.width)
    gen = torch.Generator().manual_seed(args.seed)
    if args.opt == "normgraph":
        import normgraph
        opt = normgraph.compile(model, (xtr[:4],), lr=args.lr, compile_mode="eager",
                                kinds=dict(pairs(args.kinds)) or None)
        atoms = opt.norm_graph.atoms
        sels = [sel for sel, _ in pairs(args.scale) + pairs(args.decay)] + args.late_group.split(",")
        for sel in filter(None, sels):
            if not matching(atoms, sel):
                p.error(f"selector {sel!r} matches no atom; kinds here: "
                        f"{sorted({a.kind for a in atoms.values()})}, names as in model.named_parameters()")
        for sel, f in pairs(args.scale):
            for n in matching(atoms, sel):
                atoms[n].budget *= float(f)  # the map is regenerated on the next step
        for sel, v in pairs(args.decay):
            for n in matching(atoms, sel):
                opt.group(n)["weight_decay"] = float(v)
        if args.momentum is not None:
            for g in opt.param_groups:
                g["momentum"] = args.momentum
    elif args.opt == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    else:
        opt = MuonWithAdamW(model, args.lr, args.adam_lr)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    curve: list[float] = []
    for step in range(args.steps):
        if step == args.late_adamw and args.opt == "normgraph":
            params = dict(model.named_parameters())
            picked = {n for sel in args.late_group.split(",") for n in matching(opt.norm_graph.atoms, sel)}
            names = [n for n in opt.norm_graph.atoms if n in picked]
            for n in names:
                opt.group(n)["base_lr"] = 0.0
            adam = torch.optim.AdamW([params[n] for n in names], lr=args.adam_lr, betas=(0.9, 0.95),
                                     weight_decay=0.0)
            adam.param_groups[0]["base_lr"] = args.adam_lr
            opt = Joined(opt, adam)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * (1 - step / args.steps) ** args.power
        idx = torch.randint(0, len(xtr), (args.batch,), generator=gen)
        loss = F.cross_entropy(model(pixel_values=xtr[idx]).logits, ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(loss.item())
        if not math.isfinite(curve[-1]):
            break
    tail = curve[-max(1, args.steps // 10):]
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=xte).logits
    test = F.cross_entropy(logits, yte).item()
    acc = (logits.argmax(-1) == yte).float().mean().item()
    probe = f"{args.model} layers={args.layers} {args.opt} lr={args.lr}"
    for key, value in (("scale", " ".join(args.scale)), ("decay", " ".join(args.decay)),
                       ("kinds", " ".join(args.kinds)), ("momentum", args.momentum),
                       ("power", args.power if args.power != 1 else None),
                       ("late_adamw", f"{args.late_adamw}:{args.late_group}" if args.late_adamw >= 0 else None)):
        if value:
            probe += f" {key}={value}"
    if args.curve:
        tenth = max(1, args.steps // 10)
        print("CURVE", " ".join(f"{sum(curve[i:i + tenth]) / len(curve[i:i + tenth]):.4f}"
                                for i in range(0, len(curve), tenth)))
    head = f" | {head_report(model, xtr, ytr, xte, yte)}" if args.head else ""
    print(f"RESULT seed={args.seed} {probe} | train {sum(tail) / len(tail):.4f} test {test:.4f} acc {acc:.3f}{head}",
          flush=True)


if __name__ == "__main__":
    main()
