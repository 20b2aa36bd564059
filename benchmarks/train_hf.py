"""Train unmodified transformers models with normgraph, AdamW and Muon+AdamW, same data and schedule.

Models are built from small configs (random init, nothing downloaded): GPT-2 and Llama as
causal LMs and BERT as a masked LM, on the demo's byte-level corpus (the standard library's
own source). Every run: `--steps` steps, batch `--batch`×`--block`, lr decayed linearly to 0,
train loss = mean of the last 10% of steps, held-out loss on 8 fixed batches.

    OMP_NUM_THREADS=1 python benchmarks/train_hf.py --model gpt2 --layers 6 \
        --runs normgraph:0.25,0.5,1 adamw:0.004 muon:0.04

normgraph runs use `normgraph.compile(model, (x,), lr=lr)` with everything else default
(`lr=default` uses the compile default). Muon gets the 2-D weights inside the blocks
(embeddings, the output head, gains and biases go to AdamW at `--adam-lr`), as the
torch.optim.Muon docs recommend.
"""
from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
import torch.nn.functional as F

from normgraph.demo.data import Corpus

MASK_ID = 0  # byte 0 never occurs in the corpus: BERT's [MASK]


def build(name: str, layers: int, width: int, block: int) -> torch.nn.Module:
    import transformers as T
    T.logging.set_verbosity_error()
    heads = max(1, width // 32)
    common = dict(num_hidden_layers=layers, hidden_size=width, intermediate_size=4 * width,
                  num_attention_heads=heads, vocab_size=256)
    if name == "gpt2-untied":  # GPT-2 with its own output head (tie_word_embeddings=False)
        return T.GPT2LMHeadModel(T.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=256,
                                              n_positions=block, bos_token_id=0, eos_token_id=0,
                                              tie_word_embeddings=False))
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=256,
                                              n_positions=block, bos_token_id=0, eos_token_id=0))
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=max(1, heads // 2),
                                                max_position_embeddings=block, **common))
    if name == "bert":
        return T.BertForMaskedLM(T.BertConfig(max_position_embeddings=block, **common))
    raise ValueError(name)


def loss_of(model: torch.nn.Module, name: str, x: torch.Tensor, y: torch.Tensor,
            gen: torch.Generator | None = None) -> torch.Tensor:
    if name == "bert":
        mask = torch.rand(x.shape, generator=gen) < 0.15
        inp = x.masked_fill(mask, MASK_ID)
        logits = model(input_ids=inp).logits
        return F.cross_entropy(logits[mask], x[mask])
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def make_opt(kind: str, model: torch.nn.Module, lr: float | None, example: torch.Tensor, adam_lr: float,
             mode: str, masses: dict[str, float] | None = None, kinds: dict[str, str] | None = None,
             body_profile: str = "flat", row_confidence: bool | str = "auto", muon_momentum: float = 0.95):
    if kind == "normgraph":
        import normgraph
        kw = {} if lr is None else {"lr": lr}
        return normgraph.compile(model, (example,), compile_mode="eager", sensitivity=mode, masses=masses,
                                 kinds=kinds, body_profile=body_profile, row_confidence=row_confidence, **kw)
    if kind == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)]
    if kind == "muon":
        emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        head = {id(p) for p in model.get_output_embeddings().parameters()}
        hidden = [p for p in model.parameters() if p.ndim == 2 and id(p) not in emb | head]
        ids = {id(p) for p in hidden}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return [torch.optim.Muon(hidden, lr=lr, weight_decay=0.0, momentum=muon_momentum, nesterov=True),
                torch.optim.AdamW(rest, lr=adam_lr, betas=(0.9, 0.95), weight_decay=0.0)]
    raise ValueError(kind)


def run(args: argparse.Namespace, kind: str, lr: float | None, corpus: Corpus) -> tuple[float, float, float]:
    torch.manual_seed(args.seed)
    model = build(args.model, args.layers, args.width, args.block)
    data = corpus.batches(args.batch, args.block, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    example = next(corpus.batches(args.batch, args.block, seed=args.seed))[0][:2]
    masses = {k: float(v) for k, v in (item.split("=") for item in args.masses)} or None
    kinds = dict(item.split("=") for item in args.kinds) or None
    rows = {"auto": "auto", "all": True, "none": False}[args.row_confidence]
    opt = make_opt(kind, model, lr, example, args.adam_lr, args.sensitivity, masses, kinds, args.body_profile, rows,
                   args.muon_momentum)
    opts = opt if isinstance(opt, list) else [opt]
    groups = [g for o in opts for g in o.param_groups]
    for g in groups:
        g["base_lr"] = g["lr"]
    tail, start = [], time.perf_counter()
    for step in range(args.steps):
        for g in groups:
            g["lr"] = g["base_lr"] * (1 - step / args.steps)
        x, y = next(data)
        loss = loss_of(model, args.model, x, y, gen)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        v = loss.item()
        if not math.isfinite(v):
            return math.nan, math.nan, time.perf_counter() - start
        if step >= args.steps - max(1, args.steps // 10):
            tail.append(v)
    model.eval()
    gen_eval = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        held = [loss_of(model, args.model, x, y, gen_eval).item()
                for x, y in corpus.eval_batches(args.batch, args.block, 8)]
    return sum(tail) / len(tail), sum(held) / len(held), time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("gpt2", "gpt2-untied", "llama", "bert"), default="gpt2")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adam-lr", type=float, default=0.004, help="AdamW's lr for Muon's non-matrix params")
    p.add_argument("--muon-momentum", type=float, default=0.95, help="Muon's momentum (torch's default 0.95)")
    p.add_argument("--sensitivity", default="hybrid", help="normgraph's sensitivity mode")
    p.add_argument("--body-profile", default="flat", choices=("flat", "measured"),
                   help="normgraph's budgets along the residual body (analyze's body_profile)")
    p.add_argument("--masses", nargs="*", default=[], metavar="PREFIX=MASS",
                   help="normgraph masses by module prefix, e.g. transformer.wte=0.25")
    p.add_argument("--kinds", nargs="*", default=[], metavar="PARAM=KIND",
                   help="normgraph kind overrides, e.g. transformer.wte.weight=linear")
    p.add_argument("--row-confidence", default="auto", choices=("auto", "all", "none"),
                   help="normgraph's row_confidence: auto (untied tables, the default), all (True), none (False)")
    p.add_argument("--runs", nargs="+", required=True,
                   help="optimizer:lr1,lr2,... with optimizer in normgraph, adamw, muon ('default' = compile's lr)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    corpus = Corpus.load()
    print(f"# {args.model} layers={args.layers} width={args.width} steps={args.steps} "
          f"batch={args.batch}x{args.block} seed={args.seed} threads={torch.get_num_threads()}"
          + ("" if args.row_confidence == "auto" else f" row_confidence={args.row_confidence}"), flush=True)
    print("optimizer  lr       train   held-out  seconds", flush=True)
    for spec in args.runs:
        kind, lrs = spec.split(":")
        for lr_text in lrs.split(","):
            lr = None if lr_text == "default" else float(lr_text)
            train, held, secs = run(args, kind, lr, corpus)
            print(f"{kind:10s} {lr_text:8s} {train:.4f}  {held:.4f}    {secs:.0f}", flush=True)


if __name__ == "__main__":
    main()
