"""Relative change ‖ΔW‖/‖W‖ of every matrix after a few normgraph steps: are any layers frozen?

    python benchmarks/relative_change.py --layers 12 --steps 5 --lr 0.125

Unmodified transformers models (d=128, random init) on the demo's byte corpus, default
`normgraph.compile` except lr; prints the largest / smallest relative change and where.
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F

import normgraph
from normgraph.data import Corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.125)
    p.add_argument("--sensitivity", default="scale")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import transformers as T
    T.logging.set_verbosity_error()
    L = args.layers
    cfg = dict(num_hidden_layers=L, hidden_size=128, intermediate_size=512, num_attention_heads=4,
               vocab_size=256)
    models = {
        "GPT-2 (tied head)": T.GPT2LMHeadModel(T.GPT2Config(n_layer=L, n_embd=128, n_head=4, vocab_size=256,
                                                            n_positions=64)),
        "Llama": T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **cfg)),
        "BERT": T.BertForMaskedLM(T.BertConfig(**cfg)),
    }
    corpus = Corpus.load()
    for name, model in models.items():
        torch.manual_seed(0)
        data = corpus.batches(8, 64, seed=0)
        x, y = next(data)
        opt = normgraph.compile(model, (x[:2],), lr=args.lr, compile_mode="eager", sensitivity=args.sensitivity)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 2}
        for _ in range(args.steps):
            x, y = next(data)
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        rel = {n: float((p.detach() - before[n]).norm() / before[n].norm())
               for n, p in model.named_parameters() if n in before}
        lo, hi = min(rel, key=rel.get), max(rel, key=rel.get)
        print(f"{name:18s} largest/smallest = {rel[hi] / max(rel[lo], 1e-30):8.3g}   "
              f"smallest {lo} {rel[lo]:.3g}, largest {hi} {rel[hi]:.3g}", flush=True)


if __name__ == "__main__":
    main()
