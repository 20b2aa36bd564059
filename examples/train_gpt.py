"""Train the byte-level GPT on stdlib source with any of the demo's optimizers, any size.

    python examples/train_gpt.py --optimizer normgraph --lr 0.5 --steps 1000
    python examples/train_gpt.py --device cuda --d-model 512 --n-layer 8 --batch-size 64
    python examples/train_gpt.py --optimizer adamw --lr 3e-3 --tiny --steps 3
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from normgraph.demo.data import Corpus
from normgraph.demo import DEFAULT_LRS, OPTIMIZERS, RunResult, plot_curves, results_table, train
from normgraph.demo.models import GPTConfig


def main(argv: list[str] | None = None) -> RunResult:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="normgraph")
    p.add_argument("--lr", type=float, default=None, help="default: the demo's tuned lr")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="d_model 32, 1 layer, block 16 (tests)")
    p.add_argument("--plot", default=None, help="write a loss-curve PNG here")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile normgraph's duality map (worth it for long GPU runs)")
    args = p.parse_args(argv)
    if args.tiny:
        args.d_model, args.n_layer, args.n_head, args.block_size, args.batch_size = 32, 1, 2, 16, 4
    cfg = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                    d_model=args.d_model)
    lr = args.lr if args.lr is not None else DEFAULT_LRS[args.optimizer]
    extra = {"compile_mode": "default"} if args.compile and args.optimizer == "normgraph" else {}
    result = train(args.optimizer, lr, cfg, Corpus.load(), args.steps, args.batch_size,
                   seed=args.seed, device=args.device, progress=not args.tiny, **extra)
    print(results_table([result]))
    if args.plot:
        print(f"loss curve: {plot_curves([result], Path(args.plot))}")
    return result


if __name__ == "__main__":
    main()
