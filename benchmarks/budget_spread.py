"""Largest / smallest matrix-or-embedding budget of unmodified transformers models, per mode.

    python benchmarks/budget_spread.py --layers 12

Models from small configs (d=128, random init), example batch 2×32 of token ids. A ratio of
1e12 means the smallest atom is frozen; a small ratio means every matrix trains. The last
column leaves out the tables read at fixed indices (positions, token type), which the default
slows on purpose (`POSITION_TABLE_MASS`, docs/concepts.md §5 rule 4).
"""
from __future__ import annotations

import argparse
import warnings

import torch

import normgraph
from normgraph.analysis.options import POSITION_TABLE_MASS
from normgraph.demo.models import GPT, GPTConfig

MODES = ("modula", "scale", "typical", "hybrid")


def models(layers: int) -> dict[str, torch.nn.Module]:
    import transformers as T
    T.logging.set_verbosity_error()
    cfg = dict(num_hidden_layers=layers, hidden_size=128, intermediate_size=512, num_attention_heads=4,
               vocab_size=256)
    return {
        "GPT-2": T.GPT2LMHeadModel(T.GPT2Config(n_layer=layers, n_embd=128, n_head=4, vocab_size=256,
                                                n_positions=64, bos_token_id=0, eos_token_id=0)),
        "Llama": T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **cfg)),
        "BERT": T.BertForMaskedLM(T.BertConfig(**cfg)),
        "demo GPT": GPT(GPTConfig(n_layer=layers)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[12])
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    print("model      layers  " + "  ".join(f"{m:>9s}" for m in MODES) + "  no-pos-tab   smallest (last mode)")
    for layers in args.layers:
        for name, model in models(layers).items():
            row = []
            for mode in MODES:
                ng = normgraph.analyze(model, (torch.randint(0, 256, (2, 32)),), sensitivity=mode)
                b = {n: a.budget for n, a in ng.atoms.items() if a.kind in ("linear", "embedding")}
                lo = min(b, key=b.get)
                row.append((max(b.values()) / b[lo], lo))
            rest = {n: v for n, v in b.items() if not (ng.atoms[n].kind == "embedding"
                                                       and ng.atoms[n].mass == POSITION_TABLE_MASS)}
            no_pos = max(rest.values()) / min(rest.values())
            print(f"{name:10s} {layers:6d}  " + "  ".join(f"{r[0]:9.3g}" for r in row)
                  + f"  {no_pos:10.3g}   {row[-1][1]}")


if __name__ == "__main__":
    main()
