"""normgraph under torch.distributed with 2 gloo ranks on CPU (spawned processes, loopback).

Each case trains the demo GPT or transformers' GPT-2 (packed Conv1D QKV, tied embedding) for
a few steps under DDP or FSDP2 and checks, in every rank (tests/distributed_worker.py):
the parameters match one process on the same global batch (gradients accumulated over the
ranks' shares) to 1e-5 relative; the rank's matmul FLOPs in `opt.step()` are at most
1/world + 10% of one process's; a checkpoint (torch.save under DDP, torch.distributed.
checkpoint under FSDP2) resumes bit-identically."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker  # noqa: E402

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args) -> None:
    mp.spawn(fn, args=(WORLD, free_port(), *args), nprocs=WORLD, join=True)


@pytest.mark.parametrize("kind,orthogonalizer,ns_method", [
    ("gpt", "newton-schulz", "auto"), ("gpt2", "newton-schulz", "direct"), ("gpt2", "svd", "auto")])
def test_ddp_matches_one_process_splits_the_work_and_resumes(kind, orthogonalizer, ns_method, tmp_path):
    if kind == "gpt2":
        pytest.importorskip("transformers")
    spawn(distributed_worker.ddp, kind, orthogonalizer, ns_method, str(tmp_path))
    for r in range(WORLD):
        flops, ref = map(int, (tmp_path / f"rank{r}.txt").read_text().split())
        assert flops <= (1 / WORLD + 0.1) * ref


@pytest.mark.parametrize("kind,orthogonalizer,ns_method", [
    ("gpt", "newton-schulz", "gram"), ("gpt2", "newton-schulz", "auto"), ("gpt2", "svd", "auto")])
def test_fsdp2_matches_one_process_splits_the_work_and_checkpoints(kind, orthogonalizer, ns_method, tmp_path):
    if kind == "gpt2":
        pytest.importorskip("transformers")
    spawn(distributed_worker.fsdp, kind, orthogonalizer, ns_method, str(tmp_path))
    for r in range(WORLD):
        flops, ref = map(int, (tmp_path / f"rank{r}.txt").read_text().split())
        assert flops <= (1 / WORLD + 0.1) * ref
