"""Train unmodified transformers vision models (ViT, ResNet) on scikit-learn's digits with
normgraph, AdamW and Muon+AdamW: same init, data order, steps and schedule.

    OMP_NUM_THREADS=1 python benchmarks/train_vision.py --model vit --layers 4 --seeds 0 1 2 \
        --runs normgraph:0.125,0.25 adamw:0.001,0.003 muon:0.02

Digits: 1,797 8×8 grey images (scaled to [0, 1]); the last 360 are the test set. Every run:
`--steps` steps at batch `--batch`, lr decayed linearly to 0; train loss = mean of the last
10% of steps; test loss and accuracy on the 360 held-out images. Muon takes the ≥2-D weights
except the patch/stem embedding and the classifier (as torch.optim.Muon's docs recommend,
conv kernels flattened to 2-D by Muon itself); AdamW at `--adam-lr` takes the rest.
The test loss of one setting varies by up to 0.2 between seeds, so compare the means that
`--seeds` prints, never single runs (docs/results.md §8).
"""
from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
import torch.nn.functional as F


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    return x[:-360], y[:-360], x[-360:], y[-360:]


def build(name: str, layers: int, width: int) -> torch.nn.Module:
    import transformers as T
    T.logging.set_verbosity_error()
    if name == "vit":
        return T.ViTForImageClassification(T.ViTConfig(
            image_size=8, patch_size=2, num_channels=1, hidden_size=width, num_hidden_layers=layers,
            num_attention_heads=max(1, width // 32), intermediate_size=4 * width, num_labels=10))
    if name == "resnet":
        return T.ResNetForImageClassification(T.ResNetConfig(
            num_channels=1, embedding_size=width // 2, hidden_sizes=[width // 2, width], depths=[layers // 2, layers - layers // 2],
            layer_type="basic", num_labels=10, downsample_in_first_stage=False))
    raise ValueError(name)


class MuonWithAdamW:
    """torch.optim.Muon for hidden 2-D+ weights, AdamW for the rest (the user's usual split)."""

    def __init__(self, model: torch.nn.Module, lr: float, adam_lr: float, momentum: float = 0.95) -> None:
        head = {id(p) for p in model.classifier.parameters()}
        stem = {id(p) for n, p in model.named_parameters() if "embed" in n}
        hidden = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in head | stem]
        ids = {id(p) for p in hidden}
        mats = [p for p in hidden if p.ndim == 2]
        self.muon = torch.optim.Muon(mats, lr=lr, momentum=momentum, nesterov=True) if mats else None
        # Muon is 2-D only: conv kernels go through a flattened view
        self.kernels = [p for p in hidden if p.ndim > 2]
        self.flat = [torch.nn.Parameter(p.detach().reshape(p.shape[0], -1)) for p in self.kernels]
        self.muon_conv = torch.optim.Muon(self.flat, lr=lr, momentum=momentum, nesterov=True) if self.flat else None
        self.adam = torch.optim.AdamW([p for p in model.parameters() if id(p) not in ids], lr=adam_lr,
                                      betas=(0.9, 0.95), weight_decay=0.0)
        self.opts = [o for o in (self.muon, self.adam, self.muon_conv) if o is not None]
        self.param_groups = [g for o in self.opts for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in (self.muon, self.adam):
            if o is not None:
                o.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for o in (self.muon, self.adam):
            if o is not None:
                o.step()
        if self.muon_conv:
            for k, f in zip(self.kernels, self.flat):
                f.copy_(k.reshape_as(f))
                f.grad = k.grad.reshape_as(f)
            self.muon_conv.step()
            for k, f in zip(self.kernels, self.flat):
                k.copy_(f.reshape_as(k))


def run(args: argparse.Namespace, kind: str, lr: float, data, seed: int) -> tuple[float, float, float, float]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = build(args.model, args.layers, args.width)
    gen = torch.Generator().manual_seed(seed)
    if kind == "normgraph":
        import normgraph
        opt = normgraph.compile(model, (xtr[:4],), lr=lr, compile_mode="eager", sensitivity=args.sensitivity,
                                body_decay=args.body_decay, body_profile=args.body_profile,
                                stems=args.stems == "on", channel_convs=args.channel_convs == "on")
    elif kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    else:
        opt = MuonWithAdamW(model, lr, args.adam_lr, args.muon_momentum)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    tail, start = [], time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * (1 - step / args.steps)
        idx = torch.randint(0, len(xtr), (args.batch,), generator=gen)
        loss = F.cross_entropy(model(pixel_values=xtr[idx]).logits, ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        v = loss.item()
        if not math.isfinite(v):
            return math.nan, math.nan, math.nan, time.perf_counter() - start
        if step >= args.steps - max(1, args.steps // 10):
            tail.append(v)
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=xte).logits
    test = F.cross_entropy(logits, yte).item()
    acc = (logits.argmax(-1) == yte).float().mean().item()
    return sum(tail) / len(tail), test, acc, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("vit", "resnet"), default="vit")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run every lr at each of these seeds and print their mean (digits test losses "
                        "vary by up to 0.2 between seeds: compare means of 3 or more)")
    p.add_argument("--adam-lr", type=float, default=0.003)
    p.add_argument("--muon-momentum", type=float, default=0.95, help="Muon's momentum (torch's default 0.95)")
    p.add_argument("--sensitivity", default="hybrid")
    p.add_argument("--body-decay", default="auto",
                   type=lambda v: v if v == "auto" else float(v),
                   help="normgraph's weight decay for the matrices inside residual branches (analyze's body_decay)")
    p.add_argument("--body-profile", default="flat", choices=("flat", "measured"),
                   help="normgraph's budgets along the residual body (analyze's body_profile)")
    p.add_argument("--stems", default="on", choices=("on", "off"),
                   help="a conv reading the pixels as a stem, moved entrywise (analyze's stems; rule 8)")
    p.add_argument("--channel-convs", default="on", choices=("on", "off"),
                   help="a conv read only by a BatchNorm, moved per output channel (analyze's channel_convs; rule 10)")
    p.add_argument("--runs", nargs="+", required=True, help="optimizer:lr1,lr2 (normgraph, adamw, muon)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    data = digits()
    seeds = args.seeds or [args.seed]
    print(f"# {args.model} layers={args.layers} width={args.width} steps={args.steps} batch={args.batch} "
          f"seed={','.join(map(str, seeds))} threads={torch.get_num_threads()}", flush=True)
    print("optimizer  lr       train   test    acc     seconds", flush=True)
    for spec in args.runs:
        kind, lrs = spec.split(":")
        for lr in lrs.split(","):
            rows = [run(args, kind, float(lr), data, seed) for seed in seeds]
            for seed, (train, test, acc, secs) in zip(seeds, rows):
                tag = f"   (seed {seed})" if len(seeds) > 1 else ""
                print(f"{kind:10s} {lr:8s} {train:.4f}  {test:.4f}  {acc:.3f}   {secs:.0f}{tag}", flush=True)
            if len(seeds) > 1:
                mean = [sum(r[i] for r in rows) / len(rows) for i in range(3)]
                print(f"{kind:10s} {lr:8s} {mean[0]:.4f}  {mean[1]:.4f}  {mean[2]:.3f}   -   (mean of {len(seeds)} seeds)",
                      flush=True)


if __name__ == "__main__":
    main()
