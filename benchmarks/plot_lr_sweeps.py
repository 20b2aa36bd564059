"""Plot best-lr transfer from `benchmarks/train_hf.py` outputs: train loss against lr, one curve
per depth (or width), one panel per model and optimizer.

    python benchmarks/plot_lr_sweeps.py --out docs/img/lr_depth_cpu.png sweep1.txt sweep2.txt ...

Each input file is train_hf.py's printed table (several tables may be concatenated).
"""
from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict


def parse(paths: list[str], by: str) -> dict[tuple[str, str], dict[int, list[tuple[float, float]]]]:
    """{(model, optimizer): {layers or width: [(lr, train loss)]}}"""
    out: dict = defaultdict(lambda: defaultdict(list))
    for path in paths:
        model = size = None
        for line in open(path):
            head = re.match(r"# ([\w-]+) layers=(\d+) width=(\d+)", line)
            if head:
                model, size = head.group(1), int(head.group(2 if by == "layers" else 3))
                continue
            row = line.split()
            if model and len(row) >= 3 and row[0] in ("normgraph", "adamw", "muon"):
                try:
                    lr, loss = float(row[1]), float(row[2])
                except ValueError:
                    continue
                if math.isfinite(loss):
                    out[(model, row[0])][size].append((lr, loss))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--by", choices=("layers", "width"), default="layers")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = parse(args.files, args.by)
    keys = sorted(data)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        print(f"{key[0]} {key[1]}:")
        for size, rows in sorted(data[key].items()):
            rows = sorted(rows)
            best = min(rows, key=lambda r: r[1])
            print(f"  {args.by}={size}: best lr {best[0]:g} (train loss {best[1]:.3f})")
            ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label=f"{args.by} {size}")
            ax.plot([best[0]], [best[1]], marker="*", markersize=12, color=ax.lines[-1].get_color())
        ax.set_xscale("log", base=2)
        ax.set_title(f"{key[0]}: {key[1]}")
        ax.set_xlabel("lr")
        ax.set_ylabel("train loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
