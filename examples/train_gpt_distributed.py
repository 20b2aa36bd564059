"""Train the byte-level GPT with normgraph under DDP or FSDP2, on CPUs (gloo) or GPUs (nccl).

    torchrun --nproc-per-node 2 examples/train_gpt_distributed.py --mode ddp
    torchrun --nproc-per-node 2 examples/train_gpt_distributed.py --mode fsdp --steps 200
    torchrun --nproc-per-node 8 examples/train_gpt_distributed.py --mode fsdp --d-model 768 --n-layer 12

The global batch (--batch-size) is split evenly over the ranks; every rank reads the same
deterministic stream and keeps its share, so runs with 1 and N processes see the same data.
normgraph splits its orthogonalizations over the ranks (docs/distributed.md); the script
prints the loss, the time per step and, at the end, this rank's share of the map's FLOPs.
"""
from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist

import normgraph
from normgraph.demo import Corpus, GPT, GPTConfig, loss_fn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split over the ranks")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shard-map", action="store_true",
                   help="DDP: every rank runs the whole duality map (for comparison)")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} ranks")

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    cfg = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)
    model = GPT(cfg).to(device)
    example = torch.zeros(1, args.block_size, dtype=torch.long, device=device)
    if args.mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    shard = {"shard_map": False} if args.no_shard_map else {}
    opt = normgraph.compile(model, (example,), lr=args.lr, compile_mode="default" if cuda else "eager", **shard)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / args.steps)

    batches = Corpus.load().batches(args.batch_size, args.block_size, seed=args.seed)
    times, opt_times = [], []
    for step in range(args.steps):
        x, y = next(batches)
        x, y = x[rank::world].to(device), y[rank::world].to(device)
        start = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        before_step = time.perf_counter()
        opt.step()
        schedule.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        opt_times.append(time.perf_counter() - before_step)
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)  # the mean over the global batch (equal shares)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {global_loss.item() / world:.4f}  {times[-1] * 1e3:.1f} ms/step", flush=True)
    dualize = opt.dualize
    loads = getattr(dualize, "loads", None)
    if rank == 0:
        def median(xs: list[float]) -> float:
            late = sorted(xs[len(xs) // 2:])
            return late[len(late) // 2] * 1e3
        print(f"{args.mode}, {world} rank(s): median {median(times):.1f} ms/step, of which opt.step() "
              f"{median(opt_times):.1f} ms (second half of the run)")
        if loads:
            print("orthogonalization FLOPs per rank: " + ", ".join(f"{x / 1e9:.2f} GFLOP" for x in loads))
    # Release DDP's/FSDP's last communication handles (they hold tensors) while the interpreter
    # is whole: gloo threads destroying them during interpreter teardown can abort the process.
    del opt, schedule, model, dualize
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
