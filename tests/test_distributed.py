"""normgraph under torch.distributed with 2 gloo ranks on CPU (spawned processes, loopback).

Each case trains the demo GPT, transformers' GPT-2 (packed Conv1D QKV, tied embedding) or a
small BatchNorm CNN (rule 10's channel convs: filters row-normalised, sharded by output
channel under FSDP2) for a few steps under DDP or FSDP2 and checks, in every rank
(tests/distributed_worker.py):
the parameters match one process on the same global batch (gradients accumulated over the
ranks' shares) to 1e-5 relative; the rank's matmul FLOPs in `opt.step()` are at most
1/world + 10% of one process's (not for the CNN, whose one orthogonalised atom cannot be
split); a checkpoint (torch.save under DDP, torch.distributed.checkpoint under FSDP2)
resumes bit-identically."""
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


def run_and_check(worker, kind: str, orthogonalizer: str, ns_method: str, tmp_path: Path) -> None:
    """Spawn the ranks (they assert the match and the resume) and check each rank's FLOP share."""
    if kind == "gpt2":
        pytest.importorskip("transformers")
    spawn(worker, kind, orthogonalizer, ns_method, str(tmp_path))
    if kind == "cnn":  # its one orthogonalised atom (the head) cannot be split over the ranks
        return
    for r in range(WORLD):
        flops, ref = map(int, (tmp_path / f"rank{r}.txt").read_text().split())
        assert flops <= (1 / WORLD + 0.1) * ref


@pytest.mark.parametrize("kind,orthogonalizer,ns_method", [
    ("gpt", "newton-schulz", "auto"), ("gpt", "svd", "auto"), ("gpt2", "newton-schulz", "direct"),
    ("gpt2", "svd", "auto"), ("cnn", "newton-schulz", "auto")])
def test_ddp_matches_one_process_splits_the_work_and_resumes(kind, orthogonalizer, ns_method, tmp_path):
    run_and_check(distributed_worker.ddp, kind, orthogonalizer, ns_method, tmp_path)


@pytest.mark.parametrize("kind,orthogonalizer,ns_method", [
    ("gpt", "newton-schulz", "gram"), ("gpt", "svd", "auto"), ("gpt2", "newton-schulz", "auto"),
    ("gpt2", "svd", "auto"), ("cnn", "newton-schulz", "auto")])
def test_fsdp2_matches_one_process_splits_the_work_and_checkpoints(kind, orthogonalizer, ns_method, tmp_path):
    run_and_check(distributed_worker.fsdp, kind, orthogonalizer, ns_method, tmp_path)


def test_ddp_names_masses_and_annotations_work_with_or_without_the_module_prefix(tmp_path):
    """One in-process gloo rank: DDP's `module.` names are accepted everywhere a name is."""
    import dataclasses

    import torch
    import torch.distributed as dist
    from torch import nn

    import normgraph

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        inner = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        ddp = torch.nn.parallel.DistributedDataParallel(inner)
        x = torch.randn(3, 4)
        plain = normgraph.analyze(inner, (x,))
        wrapped = normgraph.compile(ddp, (x,), compile_mode="eager")
        assert list(wrapped.norm_graph.atoms) == list(plain.atoms)  # analysed through .module
        assert not wrapped.shard_map  # one rank: nothing to split
        assert wrapped.group("module.0.weight") is wrapped.group("0.weight")
        heavy = normgraph.compile(ddp, (x,), masses={"module.0": 5.0}, compile_mode="eager")
        assert heavy.norm_graph.atoms["0.weight"].mass + heavy.norm_graph.atoms["0.bias"].mass == pytest.approx(5.0)
        direct = normgraph.analyze(ddp, (x,), masses={"module.0": 5.0}, kinds={"module.2.bias": "fallback"})
        assert direct.atoms["0.weight"].mass == heavy.norm_graph.atoms["0.weight"].mass
        assert direct.atoms["2.bias"].kind == "fallback"
        prefixed = normgraph.NormGraph(
            {f"module.{n}": dataclasses.replace(a, name=f"module.{n}") for n, a in plain.atoms.items()})
        prefixed.save(tmp_path / "ddp.json")
        from_file = normgraph.compile(ddp, annotations=tmp_path / "ddp.json", compile_mode="eager")
        assert {n: a.budget for n, a in from_file.norm_graph.atoms.items()} == {
            n: a.budget for n, a in plain.atoms.items()}
    finally:
        dist.destroy_process_group()


def test_the_distributed_example_runs_under_torchrun(tmp_path):
    import os
    import subprocess
    root = Path(__file__).resolve().parents[1]
    for mode in ("ddp", "fsdp"):
        out = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
             str(free_port()), str(root / "examples" / "train_gpt_distributed.py"), "--mode", mode, "--steps", "3",
             "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--block-size", "16", "--batch-size", "4"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"{mode}, 2 rank(s)" in out.stdout and "orthogonalization FLOPs per rank" in out.stdout


def test_fsdp2_compiles_after_to_empty_from_annotations_saved_on_meta(tmp_path):
    """docs/large_models.md: analyse on meta, save, fully_shard, to_empty, load, compile."""
    spawn(distributed_worker.fsdp_from_meta, str(tmp_path))
