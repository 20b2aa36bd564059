"""Learning-rate transfer across width: sweep lr at several widths, per optimizer.

If an optimizer's step is measured in the right norm, the best learning rate should
stay put as the model gets wider; with AdamW it typically drifts. This script trains
the byte-level GPT at each (optimizer, width, lr), plots final train loss against lr
with one line per width, and prints the table. docs/results.md records a run of it.

    python examples/lr_transfer.py --out docs/img/lr_transfer.png
    python examples/lr_transfer.py --tiny --out /tmp/lr.png      # seconds (tests)
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from normgraph.demo.data import Corpus
from normgraph.demo import train
from normgraph.demo.models import GPTConfig

GRIDS: dict[str, tuple[float, ...]] = {
    "normgraph": (0.125, 0.25, 0.5, 1.0, 2.0, 4.0),
    "adamw": (5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
}


def sweep(widths: list[int], grids: dict[str, tuple[float, ...]], steps: int, batch: int,
          n_layer: int, block: int, device: str = "cpu") -> dict[str, dict[int, list[float]]]:
    """Final train loss for every optimizer × width × lr (NaN for a diverged run)."""
    corpus = Corpus.load()
    out: dict[str, dict[int, list[float]]] = {}
    for name, lrs in grids.items():
        for width in widths:
            cfg = GPTConfig(block_size=block, n_layer=n_layer, n_head=max(1, width // 32),
                            d_model=width)
            losses = []
            for lr in lrs:
                r = train(name, lr, cfg, corpus, steps, batch, heldout_batches=0, progress=False,
                          device=device)
                loss = r.train_loss if math.isfinite(r.train_loss) else math.nan
                losses.append(loss)
                print(f"{name:9s} width {width:4d} lr {lr:<8g} train loss {loss:.3f}", flush=True)
            out.setdefault(name, {})[width] = losses
    return out


def plot(results: dict[str, dict[int, list[float]]], grids: dict[str, tuple[float, ...]],
         path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, (name, by_width) in zip(axes[0], results.items()):
        for width, losses in by_width.items():
            ax.plot(grids[name], losses, marker="o", label=f"width {width}")
            best = min(range(len(losses)), key=lambda i: losses[i] if losses[i] == losses[i] else math.inf)
            ax.plot([grids[name][best]], [losses[best]], marker="*", markersize=14, color="k")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final train loss")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, dict[int, list[float]]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", default="64,128,256")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="lr_transfer.png")
    p.add_argument("--tiny", action="store_true", help="2 widths × 2 lrs × few steps (tests)")
    args = p.parse_args(argv)
    grids = GRIDS
    widths = [int(w) for w in args.widths.split(",")]
    if args.tiny:
        grids = {k: v[2:4] for k, v in GRIDS.items()}
        widths, args.n_layer, args.block_size, args.batch_size = [32, 64], 1, 16, 4
        args.steps = min(args.steps, 3)
    torch.manual_seed(0)
    results = sweep(widths, grids, args.steps, args.batch_size, args.n_layer, args.block_size,
                    args.device)
    title = (f"{args.n_layer}-layer byte GPT, {args.steps} steps, batch {args.batch_size}×"
             f"{args.block_size}, {args.device}")
    print(f"plot: {plot(results, grids, Path(args.out), title)}")
    for name, by_width in results.items():  # the optimum per width, the number that matters
        for width, losses in by_width.items():
            i = min(range(len(losses)), key=lambda j: losses[j] if math.isfinite(losses[j]) else math.inf)
            print(f"best {name} width {width}: lr {grids[name][i]:g} (loss {losses[i]:.3f})")
    return results


if __name__ == "__main__":
    main()
