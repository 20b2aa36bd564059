"""Worker for tests/test_distributed.py: runs in each spawned rank (gloo, loopback only)."""
from __future__ import annotations

import copy
import io
import os

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

import normgraph
from test_channel_convs import Block  # a ResNet basic block: its convs are rule 10's channel convs

STEPS = 3


class CNN(torch.nn.Module):
    """A stem, two BatchNorm blocks (5 output channels: FSDP2 shards the filters 3 + 2) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 5, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(5)
        self.blocks = torch.nn.Sequential(Block(5), Block(5))
        self.head = torch.nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.relu(self.bn(self.stem(x)))).mean((2, 3)))


def build(kind: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and one global batch: token ids, or for "cnn" images and labels stacked as
    one float tensor (the label in the last pixel's place, see `loss_of`)."""
    torch.manual_seed(0)
    if kind == "cnn":
        gen = torch.Generator().manual_seed(1)
        images = torch.rand(16, 1, 6, 6, generator=gen)
        labels = torch.randint(0, 4, (16,), generator=gen)
        return CNN(), torch.cat([images.reshape(16, -1), labels[:, None].float()], dim=1)
    if kind == "gpt":
        from normgraph.demo.models import GPT, GPTConfig
        # 65 token rows: FSDP2 shards them unevenly (33 + 32)
        model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, d_model=32))
        vocab = 64
    else:
        import transformers as T
        model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, resid_pdrop=0.0,
                                                   embd_pdrop=0.0, attn_pdrop=0.0))
        vocab = 64
    ids = torch.randint(0, vocab, (16, 16), generator=torch.Generator().manual_seed(1))
    return model, ids


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if ids.is_floating_point():  # "cnn": 36 pixels and a label per row
        logits = model(ids[:, :-1].reshape(-1, 1, 6, 6))
        return torch.nn.functional.cross_entropy(logits, ids[:, -1].long())
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def example(ids: torch.Tensor) -> tuple[torch.Tensor]:
    """The example input `normgraph.compile` traces with: one row of the batch."""
    return (ids[:1, :-1].reshape(1, 1, 6, 6),) if ids.is_floating_point() else (ids[:1],)


def channel_convs(opt) -> int:
    """How many of the CNN's convs the analysis read as rule 10's channel convs."""
    return sum(a.kind == "channel_conv" for a in opt.norm_graph.atoms.values())


def step_flops(opt: torch.optim.Optimizer) -> int:
    with FlopCounterMode(display=False) as counter:
        opt.step()
    return counter.get_total_flops()


def train_side_by_side(model: torch.nn.Module, opt, reference: torch.nn.Module, ref, ids: torch.Tensor,
                       rank: int, world: int) -> tuple[int, int]:
    """STEPS steps of the distributed model on this rank's share and of the reference on the
    same global batch in one process (gradients accumulated per rank's share); the last
    step's matmul FLOPs of each optimizer."""
    local = ids[rank::world]  # equal shares: the ranks' average of the local means is the global mean
    flops = ref_flops = 0
    for _ in range(STEPS):
        opt.zero_grad()
        loss_of(model, local).backward()
        flops = step_flops(opt)
        ref.zero_grad()
        for r in range(world):
            (loss_of(reference, ids[r::world]) / world).backward()
        ref_flops = step_flops(ref)
    return flops, ref_flops


def assert_matches(params: dict[str, torch.Tensor], reference: torch.nn.Module) -> None:
    for name, p in reference.named_parameters():
        q = params[name]
        assert torch.isfinite(q).all(), name
        rel = (q - p.detach()).norm() / p.detach().norm().clamp_min(1e-30)
        assert rel <= 1e-5, f"{name}: relative difference {rel:.3g} from the single-process run"


def ddp(rank: int, world: int, port: int, kind: str, orthogonalizer: str, ns_method: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, ids = build(kind)
        reference = copy.deepcopy(model)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        # GPT-2's tables and the CNN's filters with row confidence (opt-in), the demo GPT's
        # without: both paths over ranks
        kw = dict(lr=0.05, orthogonalizer=orthogonalizer, ns_method=ns_method, compile_mode="eager",
                  row_confidence=kind != "gpt")
        opt = normgraph.compile(wrapped, example(ids), **kw)
        ref = normgraph.compile(reference, example(ids), **kw)
        assert opt.shard_map and not ref.shard_map
        assert kind != "cnn" or channel_convs(opt) == 4
        local = ids[rank::world]
        flops, ref_flops = train_side_by_side(wrapped, opt, reference, ref, ids, rank, world)
        assert_matches({n: p.detach() for n, p in model.named_parameters()}, reference)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], g) for g in gathered), "ranks are not bit-identical"
        assert kind == "cnn" or flops <= (1 / world + 0.1) * ref_flops, f"rank {rank}: {flops} of {ref_flops} FLOPs"
        # resume: save on every rank (identical), reload into a fresh optimizer, continue identically
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        loss_of(wrapped, local).backward()
        opt.step()
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n])
        again = normgraph.compile(wrapped, example(ids), **kw)
        buf.seek(0)
        again.load_state_dict(torch.load(buf, weights_only=True))
        again.zero_grad()
        loss_of(wrapped, local).backward()
        again.step()
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), after[n]), f"resume differs at {n}"
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{flops} {ref_flops}\n")
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()
    _exit_quietly()


def _exit_quietly() -> None:
    """End the worker now. Left to the interpreter's shutdown, a background C++ thread of the
    gloo/checkpoint runtime is sometimes still joinable and aborts the process ("terminate
    called without an active exception", about 1 run in 10 here) after the test passed."""
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.blocks) if hasattr(model, "blocks") else list(model.transformer.h)  # GPT, CNN: .blocks


def fsdp(rank: int, world: int, port: int, kind: str, orthogonalizer: str, ns_method: str, out_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, ids = build(kind)
        reference = copy.deepcopy(model)
        mesh = init_device_mesh("cpu", (world,))
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # GPT-2's tables and the CNN's filters with row confidence (opt-in), the demo GPT's
        # without: both paths over ranks
        kw = dict(lr=0.05, orthogonalizer=orthogonalizer, ns_method=ns_method, compile_mode="eager",
                  row_confidence=kind != "gpt")
        opt = normgraph.compile(model, example(ids), **kw)  # after sharding, as people build optimizers
        ref = normgraph.compile(reference, example(ids), **kw)
        assert opt.row_sharded
        assert kind != "cnn" or channel_convs(opt) == 4
        for name, atom in ref.norm_graph.atoms.items():  # the same analysis on the shadow
            assert opt.norm_graph.atoms[name].budget == atom.budget, name
        local = ids[rank::world]
        flops, ref_flops = train_side_by_side(model, opt, reference, ref, ids, rank, world)
        assert_matches({n: p.full_tensor().detach() for n, p in model.named_parameters()}, reference)
        assert kind == "cnn" or flops <= (1 / world + 0.1) * ref_flops, f"rank {rank}: {flops} of {ref_flops} FLOPs"
        # checkpoint with torch.distributed.checkpoint, take a step, restore, take it again
        ckpt = os.path.join(out_dir, "ckpt")
        bufs = {opt.param_groups[i]["name"]: opt.state[g["params"][0]]["momentum_buffer"].to_local().clone()
                for i, g in enumerate(opt.param_groups)}
        saved = {n: p.detach().to_local().clone() for n, p in model.named_parameters()}
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
        opt.zero_grad()
        loss_of(model, local).backward()
        opt.step()
        after = {n: p.detach().to_local().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.to_local().copy_(saved[n])
        model.zero_grad(set_to_none=True)  # a fresh run: no gradients yet (DCP then builds the state's layout)
        again = normgraph.compile(model, example(ids), **kw)
        state = {"optim": get_optimizer_state_dict(model, again)}
        dcp.load(state, checkpoint_id=ckpt)
        set_optimizer_state_dict(model, again, state["optim"])
        for g in again.param_groups:
            b = again.state[g["params"][0]]["momentum_buffer"].to_local()
            assert torch.equal(b, bufs[g["name"]]), ("buffer", g["name"], (b - bufs[g["name"]]).abs().max())
        for n, p in model.named_parameters():
            assert torch.equal(p.detach().to_local(), saved[n]), ("param after load", n)
        again.zero_grad()
        loss_of(model, local).backward()
        again.step()
        for n, p in model.named_parameters():
            assert torch.equal(p.detach().to_local(), after[n]), f"resume differs at {n}"
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{flops} {ref_flops}\n")
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()
    _exit_quietly()


def fsdp_from_meta(rank: int, world: int, port: int, out_dir: str) -> None:
    """docs/large_models.md's flow: analyse the model on the meta device (rank 0 saves the
    annotations), shard it with FSDP2, allocate with to_empty, load the weights, compile from the
    saved annotations; then train side by side with one process from the same weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor
    from normgraph.demo.models import GPT, GPTConfig

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        reference, ids = build("gpt")  # the weights to load
        cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, d_model=32)
        with torch.device("meta"):
            model = GPT(cfg)
        path = os.path.join(out_dir, "gpt.normgraph.json")
        if rank == 0:
            normgraph.analyze(model, example(ids)).save(path)
        dist.barrier()
        mesh = init_device_mesh("cpu", (world,))
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        try:
            normgraph.compile(model, annotations=path)
            raise AssertionError("compile accepted a meta model")
        except ValueError as e:
            assert "meta device" in str(e)
        model.to_empty(device="cpu")
        weights = dict(reference.named_parameters())
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(distribute_tensor(weights[name].detach(), p.device_mesh, p.placements))
        kw = dict(lr=0.05, compile_mode="eager")
        opt = normgraph.compile(model, annotations=path, **kw)
        ref = normgraph.compile(reference, example(ids), **kw)
        assert opt.row_sharded
        for name, atom in ref.norm_graph.atoms.items():
            assert opt.norm_graph.atoms[name].budget == atom.budget, name
        train_side_by_side(model, opt, reference, ref, ids, rank, world)
        assert_matches({n: p.full_tensor().detach() for n, p in model.named_parameters()}, reference)
    finally:
        dist.destroy_process_group()
