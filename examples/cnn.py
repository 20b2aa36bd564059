"""A small conv net on scikit-learn's 8×8 digits: normgraph vs AdamW.

The digits ship inside scikit-learn (no download). Both optimizers start from the same
init and see the same minibatches. The first conv reads the pixels, so normgraph moves it
entrywise (a `stem`, docs/concepts.md §5 rule 8); the second gets the per-kernel-position
orthogonalisation, the biases RMS normalisation.

    pip install -e ".[cnn]"                  # scikit-learn, the optional extra
    python examples/cnn.py                   # 300 steps each, a few seconds on CPU
    python examples/cnn.py --steps 3
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn


def make_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/test split (first 1437 / last 360 images), pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as err:
        raise SystemExit("examples/cnn.py needs scikit-learn (its digits data set): "
                         'pip install -e ".[cnn]"') from err
    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return x[:1437], y[:1437], x[1437:], y[1437:]


def run(name: str, lr: float, steps: int, batch: int = 64, seed: int = 0) -> tuple[float, float]:
    """Train with optimizer `name`; return (test loss, test accuracy)."""
    xtr, ytr, xte, yte = load_digits()
    torch.manual_seed(seed)
    net = make_net()
    if name == "normgraph":
        import normgraph
        opt = normgraph.compile(net, (xtr[:batch],), lr=lr)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    base = [g["lr"] for g in opt.param_groups]
    for step in range(steps):
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * (1 - step / steps)
        idx = torch.randint(0, len(xtr), (batch,), generator=gen)
        loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = net(xte)
        return F.cross_entropy(logits, yte).item(), (logits.argmax(1) == yte).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr-normgraph", type=float, default=0.5)
    p.add_argument("--lr-adamw", type=float, default=3e-3)
    args = p.parse_args(argv)
    out = {}
    print("| optimizer | lr | test loss | test accuracy |\n|---|---|---|---|")
    for name, lr in (("normgraph", args.lr_normgraph), ("adamw", args.lr_adamw)):
        loss, acc = out[name] = run(name, lr, args.steps)
        print(f"| {name} | {lr:g} | {loss:.3f} | {acc:.1%} |")
    return out


if __name__ == "__main__":
    main()
