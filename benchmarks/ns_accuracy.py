"""Print the singular values of Newton–Schulz output per schedule (docs/newton_schulz.md).

    python benchmarks/ns_accuracy.py [--steps 5] [--device cpu|cuda] [--dtype float32|bfloat16]

An exact orthogonalizer sends every nonzero singular value to 1; the table shows how far
each schedule gets in `steps` iterations, for Gaussian and ill-conditioned inputs.
"""
from __future__ import annotations

import argparse
import sys
import platform
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from normgraph.codegen import orthogonalizers as ortho


def conditioned(m: int, n: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    """(m, n) matrix with singular values log-spaced from 1 to 1/cond (random singular vectors)."""
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    return (u * s) @ v.T


def inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "gaussian 768×3072": torch.randn(768, 3072, generator=gen, dtype=torch.float64),
        "gaussian 768×768": torch.randn(768, 768, generator=gen, dtype=torch.float64),
        "cond 1e3 512×512": conditioned(512, 512, 1e3, gen),
        "cond 1e6 512×512": conditioned(512, 512, 1e6, gen),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    work = ortho.compute_dtype(device, getattr(torch, args.dtype) if args.dtype else None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# device {device} ({name}), compute dtype {work}, {args.steps} steps, torch {torch.__version__}")
    print(f"| input | schedule | σ min | σ max | σ mean | σ<0.5 (%) |")
    print("|---|---|---|---|---|---|")
    for label, x in inputs(torch.Generator().manual_seed(0)).items():
        x = x.to(device=device, dtype=torch.float32)
        for schedule in ortho.SCHEDULES:
            y = ortho.newton_schulz(x, args.steps, schedule, dtype=work)
            s = torch.linalg.svdvals(y.double())
            low = (s < 0.5).double().mean().item() * 100
            print(f"| {label} | {schedule} | {s.min():.3f} | {s.max():.3f} | {s.mean():.3f} | {low:.1f} |")
        s = torch.linalg.svdvals(ortho.svd_orthogonalize(x).double())
        print(f"| {label} | svd (exact) | {s.min():.3f} | {s.max():.3f} | {s.mean():.3f} | {(s < 0.5).double().mean().item() * 100:.1f} |")


if __name__ == "__main__":
    main()
