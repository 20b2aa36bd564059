"""A byte-level text corpus that every CPython install ships: its own standard library.

Why the standard library: the demo, the examples and the tests must run on a fresh
machine with no downloads, and the ``.py`` sources under ``sysconfig``'s ``stdlib``
path are real, varied text that exists wherever Python 3.11 does. The file lists are
fixed so that runs are comparable; held-out files are never trained on. (Their
contents can differ by a few lines between CPython patch releases, so compare losses
on one install.)
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

#: Training text: stable modules that exist in every CPython 3.11+ install (~430 KB).
TRAIN_FILES: tuple[str, ...] = (
    "textwrap.py", "argparse.py", "functools.py", "dataclasses.py", "fractions.py",
    "heapq.py", "json/decoder.py", "json/encoder.py", "csv.py", "shlex.py",
    "difflib.py", "calendar.py",
)
#: Held-out text: other files, used only to measure generalisation (~140 KB).
HELDOUT_FILES: tuple[str, ...] = (
    "contextlib.py", "json/__init__.py", "statistics.py", "string.py", "queue.py",
    "pprint.py",
)

VOCAB_SIZE = 256  # bytes


def stdlib_dir() -> Path:
    """The directory holding the standard library's ``.py`` sources.

    ``NORMGRAPH_CORPUS_DIR`` overrides it, so that runs on another Python (e.g. a GPU
    host with 3.12) can read the very same files copied from a 3.11 install.
    """
    return Path(os.environ.get("NORMGRAPH_CORPUS_DIR") or sysconfig.get_paths()["stdlib"])


def read_bytes(files: tuple[str, ...] | list[str], root: Path | None = None) -> torch.Tensor:
    """Concatenate `files` (relative to the stdlib dir) into one uint8 tensor of bytes."""
    root = root or stdlib_dir()
    chunks = []
    for name in files:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: normgraph's corpus needs CPython's "
                                    "standard library sources (.py files) to be installed")
        chunks.append(path.read_bytes())
    data = b"\n".join(chunks)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


@dataclass
class Corpus:
    """Train and held-out byte streams, with deterministic batching.

    Batches come from a `torch.Generator` seeded once, so two runs with the same seed
    see exactly the same data in the same order (the fairness the demo relies on).
    """

    train: torch.Tensor
    heldout: torch.Tensor

    @classmethod
    def load(cls, train_files: tuple[str, ...] = TRAIN_FILES,
             heldout_files: tuple[str, ...] = HELDOUT_FILES) -> "Corpus":
        return cls(read_bytes(train_files), read_bytes(heldout_files))

    def batches(self, batch_size: int, block_size: int, seed: int = 0, split: str = "train"):
        """Endless iterator of (inputs, targets) int64 tensors of shape [batch, block]."""
        data = self.train if split == "train" else self.heldout
        gen = torch.Generator().manual_seed(seed)
        offsets = torch.arange(block_size)
        while True:
            starts = torch.randint(0, len(data) - block_size - 1, (batch_size,), generator=gen)
            idx = starts[:, None] + offsets
            yield data[idx].long(), data[idx + 1].long()

    def eval_batches(self, batch_size: int, block_size: int, n_batches: int,
                     split: str = "heldout") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed list of batches for evaluation, the same for every optimizer."""
        it = self.batches(batch_size, block_size, seed=1234, split=split)
        return [next(it) for _ in range(n_batches)]
