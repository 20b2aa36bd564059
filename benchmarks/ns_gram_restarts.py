"""How often the bf16 Gram form must re-form X: worst σ_max per restart pattern (docs/newton_schulz.md).

    OMP_NUM_THREADS=1 python benchmarks/ns_gram_restarts.py [--device cpu|cuda] [--seeds 3]

For each schedule and restart pattern (the steps before which X ← Q·X and A ← X·Xᵀ are formed
afresh, `ortho.gram_newton_schulz`), bf16, 5 steps: the worst σ_max of the output over
Gaussian, power-law (σᵢ = 1/i), cond-1e4 and rank-8 inputs of 32×64 … 1024×4096, beside the
bf16 direct form's worst on the same inputs, over every size and over the sizes "auto" uses the
half-precision Gram form at (≥ `HALF_PRECISION_GRAM_MIN` rows). A second table scales the rows of a Gaussian by
logspace(1, 10⁻ᵏ), k = 1, 2, 3 (harder at small sizes), per size, for the shipped pattern:
it is what sets `HALF_PRECISION_GRAM_MIN`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from normgraph.codegen import orthogonalizers as ortho

SIZES = [(32, 64), (64, 128), (64, 256), (128, 256), (128, 512), (256, 1024), (384, 1536), (768, 2304),
         (768, 3072), (1024, 4096)]
PATTERNS = [(), (3,), (2,), (2, 4)]


def spectrum(m: int, n: int, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=gen, dtype=torch.float64))
    return ((u * s) @ v.T).float()


def inputs(m: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    return {"gaussian": torch.randn(m, n, generator=gen),
            "power-law": spectrum(m, n, 1.0 / torch.arange(1, k + 1, dtype=torch.float64), gen),
            "cond 1e4": spectrum(m, n, torch.logspace(0, -4, k, dtype=torch.float64), gen),
            "rank 8": torch.randn(m, 8, generator=gen) @ torch.randn(8, n, generator=gen)}


def normalised(x: torch.Tensor, safety: float, device: torch.device) -> torch.Tensor:
    y = ortho.unit_max(x.to(device).bfloat16()[None], dim=(-2, -1))
    return y / (torch.linalg.matrix_norm(y.float(), keepdim=True) * safety + ortho.NS_EPS).bfloat16()


def smax(y: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(y[0].double().cpu(), 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"# device {device}, torch {torch.__version__}, bf16, 5 steps, seeds 0..{args.seeds - 1}")
    big = ortho.HALF_PRECISION_GRAM_MIN
    print(f"| schedule | restarts before step | worst σ_max, all sizes (where) | worst σ_max, ≥ {big} rows (where) "
          f"| bf16 direct: all sizes / ≥ {big} rows |")
    print("|---|---|---|---|---|")
    cases = [(m, n, seed, fam, x) for m, n in SIZES for seed in range(args.seeds)
             for fam, x in inputs(m, n, seed).items()]
    for schedule in ortho.SCHEDULES:
        coeffs, safety = ortho.ns_schedule(schedule, 5)
        ys = [normalised(x, safety, device) for *_, x in cases]
        direct = [smax(ortho.direct_newton_schulz(y, coeffs, fused=False)) for y in ys]
        large = [min(c[:2]) >= big for c in cases]
        d_all, d_big = max(direct), max(d for d, b in zip(direct, large) if b)
        for pattern in PATTERNS:
            out = [(smax(ortho.gram_newton_schulz(y, coeffs, pattern)), f"{m}×{n} {fam}")
                   for y, (m, n, _, fam, _) in zip(ys, cases)]
            (w_all, at_all), (w_big, at_big) = max(out), max(o for o, b in zip(out, large) if b)
            print(f"| {schedule} | {', '.join(map(str, pattern)) or 'none'} | {w_all:.4g} ({at_all}) "
                  f"| {w_big:.4g} ({at_big}) | {d_all:.3f} / {d_big:.3f} |", flush=True)
    shipped = ortho.gram_restarts(torch.bfloat16, 5)
    print(f"\n# rows scaled by logspace(1, 1e-k), k = 1, 2, 3; Polar Express; Gram re-formed before {shipped}")
    print("| size | trials | worst σ_max, Gram | worst σ_max, direct |")
    print("|---|---|---|---|")
    coeffs, safety = ortho.ns_schedule("polar-express", 5)
    for m, n in [(16, 32), (16, 64), (32, 64), (64, 128), (128, 256), (256, 512), (512, 1536), (768, 3072)]:
        gen = torch.Generator().manual_seed(m * n)
        trials = max(2, min(60, 2 ** 22 // (m * n)))
        g = d = 0.0
        for _ in range(trials):
            for k in (1, 2, 3):
                x = torch.randn(m, n, generator=gen) * torch.logspace(0, -k, m)[:, None]
                y = normalised(x, safety, device)
                g = max(g, smax(ortho.gram_newton_schulz(y, coeffs, shipped)))
                d = max(d, smax(ortho.direct_newton_schulz(y, coeffs, fused=False)))
        print(f"| {m}×{n} | {trials} × 3 | {g:.3f} | {d:.3f} |", flush=True)


if __name__ == "__main__":
    main()
