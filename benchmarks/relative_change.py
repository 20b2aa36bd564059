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
from normgraph.demo.data import Corpus


class NanoGPT(torch.nn.Module):
    """nanoGPT's architecture (Karpathy): packed c_attn, GELU MLP, pre-LN, plain residuals,
    learned positions, and the output head tied to the token embedding."""

    def __init__(self, layers: int, d: int = 128, vocab: int = 256, block: int = 64, heads: int = 4) -> None:
        super().__init__()
        nn = torch.nn
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.ln1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.ln2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.c_attn = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
        self.c_proj = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.c_fc = nn.ModuleList(nn.Linear(d, 4 * d) for _ in range(layers))
        self.mlp_proj = nn.ModuleList(nn.Linear(4 * d, d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        for m in self.modules():  # nanoGPT's init: N(0, 0.02) tables and weights, zero biases
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                torch.nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for ln1, ln2, qkv, proj, fc, out in zip(self.ln1, self.ln2, self.c_attn, self.c_proj, self.c_fc,
                                                 self.mlp_proj):
            q, k, v = qkv(ln1(x)).split(x.shape[-1], dim=2)
            q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + proj(y.transpose(1, 2).reshape(b, t, -1))
            x = x + out(F.gelu(fc(ln2(x))))
        return self.lm_head(self.ln_f(x))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.125)
    p.add_argument("--sensitivity", default="hybrid")
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
        "nanoGPT-style (tied)": NanoGPT(L),
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
            out = model(x) if isinstance(model, NanoGPT) else model(input_ids=x).logits
            logits = out
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
