"""Fit per-step odd-polynomial schedules for a Newton–Schulz-type polar iteration.

    OMP_NUM_THREADS=1 python benchmarks/fit_schedule.py [--quick]     # needs scipy: pip install -e ".[fit]"

A schedule is a list of steps; step k multiplies X on the left by p_k(X Xᵀ), where
p_k(y) = c_k0 + c_k1·y + … + c_kd·y^d, so every singular value x goes to x·p_k(x²).
"quintic" = degree 2 in y (Muon's form), "nonic" = degree 4, "cubic" = degree 1.

For an interval [ℓ, 1] of normalised singular values the fit builds a greedy composition
(Polar-Express style, arXiv:2505.16932, re-derived here as linear programmes on a grid): every
step but the last is the minimax odd polynomial of its degree for the interval the previous
steps leave; the last step minimises max |f − 1| subject to f ≤ UPPER (1.15) on [0, XMAX]
(XMAX = 1.02: headroom for normaliser / bf16 rounding), so the update's σ_max stays ≤ 1.15.
With a cushion δ > 0 every step after the first is fitted on [a, b·(1 + δ)] (and its cap holds
there), so rounding noise that pushes values a little above the interval is mapped back into
range instead of being blown up by the next (steep) polynomial — necessary in bf16.
A small Nelder–Mead over per-step interval knobs then polishes the composition (it rarely
gains more than 1e-3: the greedy composition is already close to optimal, as Polar Express
proves for the symmetric problem).

Printed per schedule: the coefficient table (full precision, lowest power first, ready to
paste as constants), the worst |f − 1| on [ℓ, 1], max f on [0, XMAX], the slope f'(0), f at a
few points, Σ|c| per step (how much cancellation a monomial evaluation suffers in low
precision), and for degree-4 steps the factored form c4·(y² + α1·y + β1)·(y² + α2·y + β2),
which costs the same two matmuls (A², then q1·q2) and is much better conditioned.

Matmul cost of one step of degree d in y (m×m products beyond A = XXᵀ): d=1: 0, d=2: 1 (A²),
d=4: 2 (A², then A²·(c3·A + c4·A²) or q1·q2).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

UPPER = 1.15   # cap on every output singular value (σ_max of the update)
XMAX = 1.02    # inputs may exceed 1 by rounding; the cap must hold up to here


def step(x: np.ndarray, c) -> np.ndarray:
    """x·p(x²) for p with coefficients c (lowest degree first)."""
    y = x * x
    p = np.zeros_like(x)
    for cj in reversed(c):
        p = p * y + cj
    return x * p


def compose(x: np.ndarray, sched) -> np.ndarray:
    for c in sched:
        x = step(x, c)
    return x


def grid(lo: float, hi: float, n: int = 600) -> np.ndarray:
    """Log-spaced from lo to hi plus a linear part, so both ends are resolved."""
    return np.unique(np.concatenate([np.geomspace(lo, hi, n), np.linspace(lo, hi, n // 2)]))


def _lp(xs: np.ndarray, degree: int, hi: float, lower_only: bool, cap: float) -> np.ndarray:
    """LP on a grid: odd x·p(x²) (deg p = degree) minimising t with 1 − f ≤ t on xs, and
    f − 1 ≤ t (unless lower_only) on xs, and f ≤ cap on [0, hi]."""
    basis = np.stack([xs ** (2 * j + 1) for j in range(degree + 1)], axis=1)
    nv = degree + 2  # coefficients + t
    obj = np.zeros(nv)
    obj[-1] = 1.0
    a_ub = [np.hstack([-basis, -np.ones((len(xs), 1))])]   # 1 − f ≤ t
    b_ub = [-np.ones(len(xs))]
    if not lower_only:
        a_ub.append(np.hstack([basis, -np.ones((len(xs), 1))]))  # f − 1 ≤ t
        b_ub.append(np.ones(len(xs)))
    xc = np.linspace(0, hi, 600)
    bc = np.stack([xc ** (2 * j + 1) for j in range(degree + 1)], axis=1)
    a_ub.append(np.hstack([bc, np.zeros((len(xc), 1))]))   # f ≤ cap on [0, hi]
    b_ub.append(np.full(len(xc), cap))
    a_ub.append(np.hstack([-bc, np.zeros((len(xc), 1))]))  # f ≥ 0 on [0, hi]
    b_ub.append(np.zeros(len(xc)))
    from scipy.optimize import linprog  # only the fitting needs scipy (factor_quartic does not)
    res = linprog(obj, A_ub=np.vstack(a_ub), b_ub=np.concatenate(b_ub),
                  bounds=[(None, None)] * nv, method="highs")
    if not res.success:
        raise RuntimeError(res.message)
    return res.x[:-1]


def minimax_step(lo: float, hi: float, degree: int, cap: float = 1e3) -> np.ndarray:
    """Odd polynomial x·p(x²) minimising max |x·p(x²) − 1| on [lo, hi] (Polar Express's
    per-step problem, solved as an LP on a fine grid), with 0 ≤ f ≤ cap on [0, hi]."""
    return _lp(grid(lo, hi, 800), degree, hi, lower_only=False, cap=cap)


def last_step(lo: float, hi: float, degree: int, cap: float | None = None) -> np.ndarray:
    """The final step: minimise max |f − 1| on [lo, hi] subject to f ≤ cap (default UPPER) on
    [0, hi], i.e. the band [1 − t, min(1 + t, cap)] (the update's σ_max is what cap protects)."""
    return _lp(grid(lo, hi, 800), degree, hi, lower_only=False, cap=UPPER if cap is None else cap)


def greedy(lo: float, degrees, shrink=None, cushion: float = 0.0) -> list[np.ndarray]:
    """Greedy composition: each step but the last is minimax on the interval the previous steps
    leave (Polar Express); the last is `last_step` (band [1 − t, UPPER]). `shrink[k]` < 1 fits
    step k on [a·shrink, b] instead of [a, b] (a knob for the polish). `cushion` δ widens every
    step's interval to [a, b·(1 + δ)] (and the cap region with it), so values pushed above the
    interval by rounding noise stay in range in the next step instead of blowing up."""
    sched, a, b = [], lo, XMAX
    for k, d in enumerate(degrees):
        a_fit = a * (shrink[k] if shrink is not None else 1.0)
        hi = b * (1.0 + cushion) if k > 0 else b
        if k + 1 < len(degrees):
            c = minimax_step(a_fit, hi, d)
        else:
            c = last_step(a_fit, hi, d)
        sched.append(c)
        xs = grid(a, hi, 4000)
        ys = step(xs, c)
        a, b = float(ys.min()), float(step(np.linspace(0, hi, 4001), c).max())
    return sched


def evaluate(sched, lo: float) -> dict:
    xs = grid(lo, 1.0, 20000)
    # robustness: worst final value when every intermediate value is inflated by 5 % / 10 %
    def inflated(x, fac):
        for c in sched[:-1]:
            x = step(x, c) * fac
        return step(x, sched[-1])
    xa_ = np.linspace(0.0, XMAX, 4001)
    rob5, rob10 = float(inflated(xa_, 1.05).max()), float(inflated(xa_, 1.10).max())
    f = compose(xs, sched)
    xa = np.linspace(0.0, XMAX, 20001)
    fa = compose(xa, sched)
    xl = np.linspace(0.0, lo, 2001)[1:]
    slope = compose(np.array([1e-9]), sched)[0] / 1e-9
    return {"err": float(np.abs(f - 1).max()), "f_min": float(f.min()), "f_max_all": float(fa.max()),
            "f_max_inflated5": rob5, "f_max_inflated10": rob10,
            "f_min_below": float(compose(xl, sched).min()), "slope0": float(slope)}


def fit(lo: float, degrees, tune: bool = True, cushion: float = 0.0) -> tuple[list[np.ndarray], dict]:
    """Greedy start, then a small Nelder–Mead over the per-step interval knobs (`shrink`)
    to minimise the composition's worst error on [lo, 1] (the last step is always the LP)."""
    from scipy.optimize import minimize as _min
    n = len(degrees) - 1

    def build(z):
        return greedy(lo, degrees, shrink=list(np.exp(np.clip(z, -3, 1))) + [1.0], cushion=cushion)

    def loss(z):
        try:
            ev = evaluate(build(z), lo)
        except RuntimeError:
            return 10.0
        bad = max(0.0, ev["f_max_all"] - UPPER - 1e-3) + max(0.0, -ev["f_min_below"])
        return ev["err"] + 10 * bad

    z0 = np.zeros(n)
    best_z, best = z0, loss(z0)
    if tune and n > 0:
        res = _min(loss, z0, method="Nelder-Mead", options={"maxiter": 60 * n, "xatol": 1e-3, "fatol": 1e-5})
        if res.fun < best:
            best_z, best = res.x, res.fun
    sched = build(best_z)
    return sched, evaluate(sched, lo)


def factor_quartic(c, hi: float = XMAX) -> tuple[float, tuple[float, float], tuple[float, float], float]:
    """p(y) = c4·(y² + α1·y + β1)·(y² + α2·y + β2) with real α, β: pairs the four roots
    (conjugate pairs stay together; real roots are paired to keep max |q_i| on [0, hi²] small).
    Returns c4, (α1, β1), (α2, β2) and the conditioning |c4|·max|q1|·max|q2| / min |p| on [0, hi²]."""
    c = np.asarray(c, dtype=float)
    roots = np.roots(c[::-1])
    ys = np.linspace(0, hi * hi, 2001)
    best = None
    for pair in ((0, 1), (0, 2), (0, 3)):
        rest = tuple(i for i in range(4) if i not in pair)
        qs = []
        for idx in (pair, rest):
            r1, r2 = roots[idx[0]], roots[idx[1]]
            alpha, beta = -(r1 + r2), r1 * r2
            if abs(alpha.imag) > 1e-9 * max(1, abs(alpha)) or abs(beta.imag) > 1e-9 * max(1, abs(beta)):
                break
            qs.append((float(alpha.real), float(beta.real)))
        if len(qs) < 2:
            continue
        m1 = np.abs(ys ** 2 + qs[0][0] * ys + qs[0][1]).max()
        m2 = np.abs(ys ** 2 + qs[1][0] * ys + qs[1][1]).max()
        pmin = np.abs(np.polyval(c[::-1], ys)).min()
        kappa = abs(c[4]) * m1 * m2 / max(pmin, 1e-300)
        if best is None or kappa < best[3]:
            best = (float(c[4]), qs[0], qs[1], float(kappa))
    if best is None:
        raise RuntimeError("no real quadratic pairing")
    return best


def muon_eval(lo: float, steps: int = 5) -> dict:
    return evaluate([np.array([3.4445, -4.7750, 2.0315])] * steps, lo)


NAMES = {1: "cubic", 2: "quintic", 3: "septic", 4: "nonic"}

#: The schedules benchmarks/ns_candidates.py uses: name -> (ℓ it is fitted for, degrees per step).
#: ℓ = 2.5e-3 is the lower end of the power-law family (σ_min/σ_max = 1/384) after the
#: ‖A²‖_F^¼ normaliser (which is within 0.05% of σ_max there); 1e-3 is the issue's threshold.
TABLES = {
    "Q3_l2.5e-3": (2.5e-3, (2, 2, 2), 0.0),
    "Q4_l2.5e-3": (2.5e-3, (2, 2, 2, 2), 0.0),
    "N3_l2.5e-3": (2.5e-3, (4, 4, 4), 0.0),
    "N3_l2.5e-3_c5": (2.5e-3, (4, 4, 4), 0.05),
    "N3_l2.5e-3_c10": (2.5e-3, (4, 4, 4), 0.10),
    "C2N2_l2.5e-3": (2.5e-3, (1, 1, 4, 4), 0.0),
    "N3C1_l1e-3": (1e-3, (4, 4, 4, 1), 0.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="names from TABLES to fit (default all)")
    ap.add_argument("--lo", type=float, help="fit a custom ℓ (with --degrees)")
    ap.add_argument("--degrees", type=str, help="comma-separated degrees in y per step, e.g. 4,2,2")
    ap.add_argument("--cushion", type=float, default=0.0, help="with --lo: interval widening δ per step")
    ap.add_argument("--no-tune", action="store_true", help="greedy only (skip the Nelder–Mead polish)")
    ap.add_argument("--json", help="also write the tables to this JSON file")
    args = ap.parse_args()
    print(f"# fit_schedule: cap f ≤ {UPPER} on [0, {XMAX}], f ≥ 0 below ℓ; numpy {np.__version__}")
    for lo in (2.5e-3, 1e-3):
        ev = muon_eval(lo)
        print(f"# reference: Muon quintic ×5 on [{lo:g}, 1]: err {ev['err']:.4f}, max f {ev['f_max_all']:.4f}, "
              f"slope f'(0) {ev['slope0']:.1f}")
    jobs = {}
    if args.lo is not None:
        jobs[f"custom_l{args.lo:g}"] = (args.lo, tuple(int(d) for d in args.degrees.split(",")), args.cushion)
    else:
        for k, v in TABLES.items():
            if not args.only or k in args.only:
                jobs[k] = v
    out = {}
    for name, (lo, degs, cushion) in jobs.items():
        t0 = time.time()
        sched, ev = fit(lo, degs, tune=not args.no_tune, cushion=cushion)
        kinds = "+".join(NAMES[d] for d in degs)
        print(f"\n## {name}: ℓ={lo:g}, steps {kinds}, cushion δ={cushion:g}  ({time.time() - t0:.1f}s to fit)")
        print(f"#  robustness: max f when every intermediate value is inflated ×1.05: {ev['f_max_inflated5']:.4g}, "
              f"×1.10: {ev['f_max_inflated10']:.4g}")
        print(f"#  worst |f−1| on [ℓ,1] = {ev['err']:.5f}   min f on [ℓ,1] = {ev['f_min']:.5f}   "
              f"max f on [0,{XMAX}] = {ev['f_max_all']:.5f}   f'(0) = {ev['slope0']:.1f}")
        print("#  " + "   ".join(f"f({x:g}) = {compose(np.array([x]), sched)[0]:.4f}"
                                 for x in (lo / 4, lo / 2, lo, 2 * lo, 1e-2, 0.1, 1.0)))
        print("#  Σ|c| per step: " + ", ".join(f"{np.abs(c).sum():.1f}" for c in sched))
        print(f"{name.replace('.', '_').replace('-', '_').upper()} = (")
        for c in sched:
            print("    (" + ", ".join(repr(float(v)) for v in c) + "),")
        print(")")
        facts = []
        for k, c in enumerate(sched):
            if len(c) == 5:
                c4, q1, q2, kappa = factor_quartic(c)
                facts.append([k, c4, q1, q2])
                print(f"#  step {k} factored: {c4!r} * (y² + {q1[0]!r}·y + {q1[1]!r}) * (y² + {q2[0]!r}·y + {q2[1]!r})"
                      f"   [conditioning {kappa:.1f} vs monomial Σ|c|/min|p| "
                      f"{np.abs(c).sum() / np.abs(np.polyval(c[::-1], np.linspace(0, XMAX**2, 2001))).min():.1f}]")
        out[name] = {"lo": lo, "degrees": list(degs), "cushion": cushion, "coeffs": [[float(v) for v in c] for c in sched],
                     "factored": facts, **ev}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
