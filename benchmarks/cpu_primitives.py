"""Price of the building blocks an orthogonalizer can use, in units of one bf16 matmul.

Why: issue 14 asks for Muon's accuracy at half its FLOPs and 2× its speed on CPU. Muon runs
in bf16 at the matmul roofline, so any faster map must spend fewer bf16-matmul-equivalents.
This prints what each alternative primitive costs on this machine (one run, side by side):
fp32 matmuls (the Gram recursion needs them), Cholesky, its inverse and triangular solves
(rational iterations such as QDWH need them; torch has no bf16 version of these on CPU).

    OMP_NUM_THREADS=1 python benchmarks/cpu_primitives.py --m 384 --batch 4
"""
from __future__ import annotations

import argparse
import time

import torch


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, default=384, help="the square size (a GPT hidden size)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.manual_seed(0)
    m, b = args.m, args.batch
    xb = torch.randn(b, m, m, dtype=torch.bfloat16)
    xf = xb.float()
    spd = xf @ xf.mT / m + torch.eye(m)
    chol = torch.linalg.cholesky(spd)
    rows = [
        ("bf16 matmul m×m·m×m (the unit)", lambda: torch.bmm(xb, xb)),
        ("fp32 matmul m×m·m×m", lambda: torch.bmm(xf, xf)),
        ("fp32 Cholesky of m×m", lambda: torch.linalg.cholesky(spd)),
        ("fp32 inverse from Cholesky factor", lambda: torch.cholesky_inverse(chol)),
        ("fp32 triangular solve, m right-hand sides", lambda: torch.linalg.solve_triangular(chol, xf, upper=False)),
        ("fp32 cholesky_solve, m right-hand sides", lambda: torch.cholesky_solve(xf, chol)),
    ]
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, batch {b} × {m}², median of {args.repeats}")
    unit = None
    print(f"{'primitive':48s} {'ms':>8s} {'bf16 matmuls':>13s}")
    for name, fn in rows:
        ms = median_ms(fn, args.repeats)
        unit = unit or ms
        print(f"{name:48s} {ms:8.3f} {ms / unit:13.2f}")


if __name__ == "__main__":
    main()
