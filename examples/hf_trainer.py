"""Hand a normgraph optimizer to a Hugging Face `Trainer`.

A tiny GPT-2 is built from a config with random init (no downloads) and trained on
byte-level chunks of the standard library's source. `Trainer` accepts any
`torch.optim.Optimizer` through ``optimizers=(optimizer, scheduler)``; passing ``None``
for the scheduler lets it build its usual linear schedule around normgraph's optimizer.

    python examples/hf_trainer.py            # ~200 steps on CPU
    python examples/hf_trainer.py --tiny --steps 3
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from torch.utils.data import Dataset

import normgraph
from normgraph.demo.data import Corpus


class ByteChunks(Dataset):
    """Fixed, non-overlapping chunks of bytes; GPT-2 shifts `labels` itself."""

    def __init__(self, data: torch.Tensor, block: int) -> None:
        n = (len(data) - 1) // block
        self.chunks = data[: n * block].long().view(n, block)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--tiny", action="store_true", help="a 1-layer, 32-wide model (for tests)")
    args = p.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    width, layers, block = (32, 1, 32) if args.tiny else (128, 2, 64)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=block, n_embd=width, n_layer=layers,
                        n_head=4, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config)
    corpus = Corpus.load()
    train_set, eval_set = ByteChunks(corpus.train, block), ByteChunks(corpus.heldout, block)
    example = {"input_ids": train_set[0]["input_ids"][None]}
    opt = normgraph.compile(model, example_kwargs=example, lr=args.lr)
    print(opt.norm_graph.table())

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=16,
                                  per_device_eval_batch_size=16, logging_steps=max(1, args.steps // 10),
                                  report_to=[], save_strategy="no", use_cpu=True, seed=0,
                                  dataloader_num_workers=0)
        trainer = Trainer(model=model, args=targs, train_dataset=train_set,
                          eval_dataset=torch.utils.data.Subset(eval_set, range(64)),
                          optimizers=(opt, None))
        trainer.train()
        loss = trainer.evaluate()["eval_loss"]
    print(f"held-out loss after {args.steps} steps: {loss:.3f} nats/byte")
    return loss


if __name__ == "__main__":
    main()
