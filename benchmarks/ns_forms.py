"""Direct vs Gram form of Newton–Schulz: error against the float64 iteration (docs/newton_schulz.md).

    python benchmarks/ns_forms.py [--steps 5] [--device cpu|cuda]

Both forms evaluate the same polynomial; they differ in rounding. For each input, schedule,
compute dtype and form the table gives σ_max of the result and ‖result − reference‖₂, where
the reference is the direct form in float64. In half precision normgraph re-forms X and its
Gram matrix every 2 steps (`ortho.gram_restarts`); the "Gram, unbroken" rows call
`ortho.gram_newton_schulz` without restarts to show why.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from normgraph.codegen import orthogonalizers as ortho
from ns_accuracy import conditioned  # noqa: E402  (same directory)


def run(x: torch.Tensor, schedule: str, steps: int, dtype: torch.dtype, gram: bool,
        restarts: tuple[int, ...] = ()) -> torch.Tensor:
    """The normalised iteration in `dtype`, either form (x is wide: m <= n)."""
    coeffs, safety = ortho.ns_schedule(schedule, steps)
    y = x.to(dtype).unsqueeze(0)
    y = y / (torch.linalg.matrix_norm(y.double(), keepdim=True) * safety + 1e-7).to(dtype)
    out = ortho.gram_newton_schulz(y, coeffs, restarts) if gram else ortho.direct_newton_schulz(y, coeffs, fused=False)
    return out[0].double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# device {device} ({name}), {args.steps} steps, torch {torch.__version__}")
    print("| input | schedule | compute | form | σ max | ‖out − ref‖₂ |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    cases = {"gaussian 768×2304": torch.randn(768, 2304, generator=gen, dtype=torch.float64),
             "gaussian 768×3072": torch.randn(768, 3072, generator=gen, dtype=torch.float64),
             "cond 1e4 768×3072": conditioned(768, 3072, 1e4, gen)}
    for label, x in cases.items():
        x = x.to(device)
        for schedule in ortho.SCHEDULES:
            ref = run(x, schedule, args.steps, torch.float64, gram=False)
            print(f"| {label} | {schedule} | float64 | direct (reference) | "
                  f"{torch.linalg.matrix_norm(ref, 2):.4f} | 0 |")
            for dtype in (torch.float32, torch.bfloat16):
                restarts = ortho.gram_restarts(dtype, args.steps)
                forms = [("direct", False, ())]
                if restarts:
                    forms += [("Gram, unbroken", True, ()), (f"Gram, re-formed before steps {restarts}", True, restarts)]
                else:
                    forms += [("Gram", True, ())]
                for name, gram, rs in forms:
                    out = run(x, schedule, args.steps, dtype, gram, rs)
                    err = torch.linalg.matrix_norm(out - ref, 2)
                    print(f"| {label} | {schedule} | {str(dtype)[6:]} | {name} | "
                          f"{torch.linalg.matrix_norm(out, 2):.4f} | {err:.1e} |")


if __name__ == "__main__":
    main()
