"""Candidate replacements for Muon's 5-step quintic Newton–Schulz: accuracy, σ_max, FLOPs, time.

    OMP_NUM_THREADS=1 python benchmarks/ns_candidates.py [--only NAME ...] [--repeats 3]

Accuracy measure (fixed by the issue): for G = U diag(σ) Vᵀ (float64 SVD) and output O,
err(G) = max_i |(Uᵀ O V)_ii − 1| over directions with σ_i ≥ 1e-3·σ_max; worst over a family.
Matrices: GPT shapes at d=384 as nn.Linear weights (out, in): 1152×384, 384×384, 1536×384,
384×1536; families: Gaussian, power-law σ_i = 1/i, log-spaced condition number 1e4 (random
orthogonal singular vectors); plus rank-16 (err over its 16 directions, and "leak16" =
‖(I − U₁₆U₁₆ᵀ)·O‖₂, what lands in the null space) and all-zero inputs (must give exactly 0).

Compute dtypes: "float32" runs everything in fp32. "bfloat16" keeps X in bf16 (input cast to
bf16 as torch.optim.Muon does; every P·X / Q·X result is stored in bf16). Where the m×m work
goes is per candidate (`Prec`): plain bf16 tensors (CPU bf16 matmuls round their output to bf16,
as a GPU GEMM with bf16 output does), or fp32 / TF32 / fp16 with X Xᵀ taken from bf16 inputs
with fp32 accumulation (a tensor-core GEMM with fp32 output); P·X / Q·X then round P or Q to
bf16, or to fp16 ("fp16 QX": fp16 inputs, same tensor-core rate as bf16), or split it into two
bf16 parts ("split", one more m²n). TF32 is emulated by rounding GEMM inputs to 10 mantissa bits.

FLOPs are multiply-adds of matmuls (m ≤ n after transposing tall matrices): X Xᵀ and P·X cost
m²n, every m×m product m³; elementwise work is not counted. Relative to torch.optim.Muon
(5 direct quintic steps = 5·(2m²n + m³)), for one GPT layer's four matrices with the packed QKV
(1152×384) kept whole and split into three 384×384. Each candidate picks per shape the cheaper
of its direct and Gram forms unless it says otherwise.

Times are CPU wall-clock per call of the whole layer (the four matrices, QKV whole), median of
`--repeats`, in one process, single-threaded (run with OMP_NUM_THREADS=1; torch.set_num_threads(1)
is also called) — relative numbers only; they are not GPU timings.

The coefficient tables below were produced by benchmarks/fit_schedule.py (printed there in full
precision; see that file for how they are fitted).
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

torch.set_num_threads(1)

# --------------------------------------------------------------------------------------------
# Coefficient tables (per step: coefficients of p(y), lowest power first; X ← p(XXᵀ)·X).
# --------------------------------------------------------------------------------------------
MUON = (3.4445, -4.7750, 2.0315)
#: Polar Express 5-step table as shipped in normgraph (l=1e-3, safety 1.02 folded into steps 1-4).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# From `OMP_NUM_THREADS=1 python benchmarks/fit_schedule.py` (also in results/ns_schedules.json):
# ℓ = fitted lower end, f ≤ 1.15 on [0, 1.02]; _C5/_C10 = cushion δ = 0.05 / 0.10 (see fit_schedule.py).
Q3_L2_5E_3 = (  # err on [ℓ,1] 0.7952, f'(0) 82.4
    (8.242303653419794, -23.424934675080046, 16.69346912735247),
    (4.0806014419536325, -3.0375381609028573, 0.5725214760665706),
    (2.449535725149895, -1.833776485553429, 0.3623107910478187),
)
Q4_L2_5E_3 = (  # err on [ℓ,1] 0.3203, f'(0) 292.8
    (8.242286919637856, -23.424871507743738, 16.693420941936804),
    (4.0805817389320165, -3.0375268894833414, 0.5725208967590398),
    (3.6159740073334605, -2.7069946518692096, 0.5348417422778381),
    (2.4079116803629903, -1.7868720523230015, 0.41167320163757704),
)
N3_L2_5E_3 = (  # err on [ℓ,1] 0.1820, f'(0) 368.9
    (14.582090963295446, -137.0316809342516, 438.102089153077, -541.1430890556761, 226.26859183965067),
    (6.5963331781911645, -15.885890188710794, 13.494723363619945, -4.464580701074025, 0.5015452167061542),
    (3.835139891835192, -7.748139214380657, 7.079908564614284, -2.7033124646071593, 0.36096823070585676),
)
N3_L2_5E_3_C5 = (  # err on [ℓ,1] 0.2263, f'(0) 343.2
    (14.582090963295446, -137.0316809342516, 438.102089153077, -541.1430890556761, 226.26859183965067),
    (6.327152576741085, -13.860733666276783, 10.689176855978609, -3.2090010058342298, 0.32706338903814614),
    (3.719500842429281, -7.021881796681777, 5.857791095109108, -2.025724503436578, 0.24410294420070425),
)
N3_L2_5E_3_C10 = (  # err on [ℓ,1] 0.2691, f'(0) 319.7
    (14.582090963295446, -137.0316809342516, 438.102089153077, -541.1430890556761, 226.26859183965067),
    (6.079156423717583, -12.166248138024091, 8.555768856971053, -2.341253265086981, 0.21747249677537678),
    (3.606597471495476, -6.365409306236752, 4.8613987572231165, -1.528487543761455, 0.16694966257022525),
)
C2N2_L2_5E_3 = (  # err on [ℓ,1] 0.2355, f'(0) 337.9
    (5.05586824344853, -4.847630766513172),
    (2.564034995862322, -0.6450582569282002),
    (6.695899348320761, -16.168774709381935, 13.706510409505913, -4.5203448009531435, 0.5059961239140407),
    (3.893262232834083, -8.042530315406708, 7.307808741581421, -2.7484023710224763, 0.3599348212919251),
)
N3C1_L1E_3 = (  # err on [ℓ,1] 0.1767, f'(0) 931.2
    (14.782936378052387, -139.5633313922867, 446.7967195031129, -552.2385341680118, 230.99560401526887),
    (7.163343371596086, -17.491519901266734, 14.693868844920923, -4.7806030747277175, 0.5269967573692027),
    (5.27120228864091, -12.045755201518011, 10.560194448324012, -3.6802734399141754, 0.4390592031824463),
    (1.6682678512121445, -0.5201120101189156),
)

POWERS = {1: 0, 2: 1, 4: 2}  # m×m products to form p(A) beyond A itself (degree in y → cost)


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------
@dataclass
class Cand:
    name: str
    sched: tuple
    norm: str = "a2"            # "fro": ‖X‖_F·safety; "a2": ‖(XXᵀ)²‖_F^¼ (free: A² is step 1's);
    #                             "aol": AOL row scaling diag(Σ_j|A_ij|)^-½ (changes the polar factor)
    safety: float = 1.0
    form: str = "auto"          # "direct", "gram", "auto" (cheaper by FLOPs per shape)
    factored: bool = True       # evaluate degree-4 steps as c4·q1(A)·q2(A) (else Paterson–Stockmeyer)
    loop: str = "same"          # bf16 only: precision of the m×m work, see `Prec`
    qx: str = "bf16"            # bf16 only: how P·X / Q·X round P or Q, see `Prec`
    loop_direct: str | None = None  # bf16 only: m×m precision for shapes run in direct form (default `loop`)
    restart: tuple = ()         # Gram: re-form X ← Q·X and A ← XXᵀ after these steps (0-based)
    torch_muon: bool = False    # call torch.optim._muon._zeropower_via_newtonschulz (bf16 only)
    note: str = ""
    fq: list = field(default_factory=list)


def factor_quartic(c):
    """p(y) = c4·(y² + α1 y + β1)(y² + α2 y + β2) with real α, β: `fit_schedule.factor_quartic`
    (its best-conditioned real pairing). Returns c4, (α1, β1), (α2, β2)."""
    from fit_schedule import factor_quartic as factor
    return factor(c)[:3]


def step_cost(d: int) -> int:
    return POWERS[d]


def flops(c: Cand, rows: int, cols: int, form: str | None = None, sym: bool = False) -> float:
    """Matmul multiply-adds of candidate c on one rows×cols matrix (form forced or c's choice).

    sym=True counts products whose result is symmetric (X Xᵀ, and every m×m product here: they
    are all polynomials in the same A, so they commute) at half, as a symmetric GEMM (SYRK-like
    kernel) computes one triangle; P·X and Q·X stay full. Applied to Muon too."""
    m, n = sorted((rows, cols))
    big, small = m * m * n, m ** 3
    h = 0.5 if sym else 1.0
    if c.torch_muon or c.name.startswith("Muon"):
        return 5 * (big * (1 + h) + small * h)
    form = form or pick_form(c, rows, cols)
    degs = [len(s) - 1 for s in c.sched]
    extra_a2 = 1 if (c.norm == "a2" and degs[0] < 2) else 0  # A² only for the normaliser
    if form == "direct":
        return sum(big * (1 + h) + step_cost(d) * small * h for d in degs) + extra_a2 * small * h
    total, K = 0.0, len(degs)
    seg_start = 0
    ends = sorted(set(c.restart) | {K - 1})
    for end in ends:
        seg = degs[seg_start:end + 1]
        total += big * h + big * (2 if c.qx == "split" else 1)  # A = XXᵀ, then Q·X
        for j, d in enumerate(seg):
            total += step_cost(d) * small * h
            total += small * h if j > 0 else 0            # Q ← P·Q
            total += 2 * small * h if j < len(seg) - 1 else 0  # A ← P·A·P
        seg_start = end + 1
    return total + extra_a2 * small * h


def pick_form(c: Cand, rows: int, cols: int) -> str:
    if c.form != "auto":
        return c.form
    return "gram" if flops(c, rows, cols, "gram") < flops(c, rows, cols, "direct") else "direct"


# --------------------------------------------------------------------------------------------
# The iteration
# --------------------------------------------------------------------------------------------
def _tf32(t: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (10-bit mantissa, round to nearest) — a tensor-core TF32 GEMM input."""
    i = t.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


class Prec:
    """Where each product is rounded. `loop` is the precision of the m×m work (A, A², P, Q, P·A·P):
    "same" = the compute dtype throughout (plain bf16 or fp32 tensors); "fp32"; "tf32" (inputs
    rounded to TF32, fp32 accumulate/output); "fp16" (fp16 inputs and outputs, fp32 accumulate).
    The big products (X Xᵀ, P·X, Q·X) always take X in the compute dtype; with a non-"same" loop
    X Xᵀ accumulates in fp32 and is stored at loop precision, and P·X / Q·X round P (or Q) to
    `qx` ("bf16", "fp16" — then X is also fed as fp16 —, or "split": bf16(Q) plus bf16 of the
    remainder, one more m²n), accumulate in fp32 and return the compute dtype."""

    def __init__(self, loop: str, qx: str, dtype: torch.dtype):
        self.loop, self.qx, self.dtype = loop, qx, dtype

    def store(self, t):
        if self.loop == "same":
            return t.to(self.dtype)
        if self.loop == "fp16":
            return t.half().float()
        if self.loop == "tf32":
            return t.float()
        return t.float()

    def mm(self, a, b):
        if self.loop == "same":
            return a @ b
        if self.loop == "tf32":
            return _tf32(a) @ _tf32(b)
        if self.loop == "fp16":
            return (a.half().float() @ b.half().float()).half().float()
        return a @ b

    def aat(self, X):
        if self.loop == "same":
            return X @ X.T
        Xf = X.float()
        return self.store(Xf @ Xf.T)

    def apply(self, P, X, c0=None):
        """(c0·I + P)·X in the compute dtype."""
        if self.loop == "same":
            return P @ X if c0 is None else c0 * X + P @ X
        if self.qx == "fp16":
            out = P.half().float() @ X.half().float()
        else:
            ph = P.to(self.dtype).float()
            out = ph @ X.float()
            if self.qx == "split":
                out = out + (P - ph).to(self.dtype).float() @ X.float()
        if c0 is not None:
            out = out + c0 * X.float()
        return out.to(self.dtype)


def _poly_nc(pr: Prec, A, A2, coeffs, factored, fq):
    """p(A) − c0·I (the constant is applied separately, as Muon does, to keep it exact)."""
    d = len(coeffs) - 1
    if d == 1:
        return coeffs[1] * A
    if d == 2:
        return coeffs[1] * A + coeffs[2] * A2
    if factored:
        c4, (a1, b1), (a2, b2) = fq
        eye = torch.eye(A.shape[0], dtype=A.dtype)
        q1 = A2 + a1 * A + b1 * eye
        q2 = A2 + a2 * A + b2 * eye
        p = c4 * pr.mm(q1, q2)
        p.diagonal().sub_(coeffs[0])
        return p
    return coeffs[1] * A + coeffs[2] * A2 + pr.mm(A2, coeffs[3] * A + coeffs[4] * A2)


def orthogonalize(c: Cand, G: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if c.torch_muon:
        from torch.optim._muon import _zeropower_via_newtonschulz
        return _zeropower_via_newtonschulz(G, MUON, 5, 1e-7).float()
    tall = G.shape[0] > G.shape[1]
    X = (G.T if tall else G).to(dtype)
    degs = [len(s) - 1 for s in c.sched]
    form = pick_form(c, *G.shape)
    loop = (c.loop_direct or c.loop) if form == "direct" else c.loop
    pr = Prec(loop if dtype != torch.float32 else "same", c.qx, dtype)
    # Frobenius prescale (overflow-safe; a zero matrix stays exactly 0).
    fro = X.float().norm()
    X = (X.float() / (fro * c.safety + 1e-7)).to(dtype)
    A = pr.aat(X)
    A2 = pr.mm(A, A) if (degs[0] >= 2 or c.norm == "a2") else None
    if c.norm == "a2":  # ‖A²‖_F^¼ = (Σσ⁸)^⅛ ≥ σ_max, from the A² that step 1 needs anyway
        s = A2.float().norm().clamp_min(1e-30).pow(0.25)
        s = torch.where(fro > 0, s, torch.ones_like(s))
        X = (X.float() / s).to(dtype)
        A = pr.store(A.float() / s ** 2) if pr.loop != "same" else (A.float() / s ** 2).to(dtype)
        A2 = pr.store(A2.float() / s ** 4) if pr.loop != "same" else (A2.float() / s ** 4).to(dtype)
    elif c.norm == "aol":  # Turbo-Muon: rows scaled by (Σ_j |A_ij|)^-½ (guarantees ‖X‖₂ ≤ 1)
        rs = A.float().abs().sum(dim=1)
        r = torch.where(rs > 0, rs.clamp_min(1e-30).rsqrt(), torch.zeros_like(rs))
        X = (X.float() * r[:, None]).to(dtype)
        A = (A.float() * r[:, None] * r[None, :]).to(A.dtype)
        A2 = pr.mm(A, A) if degs[0] >= 2 else None

    if form == "direct":
        for k, coeffs in enumerate(c.sched):
            if k > 0:
                A = pr.aat(X)
                A2 = pr.mm(A, A) if degs[k] >= 2 else None
            pnc = _poly_nc(pr, A, A2, coeffs, c.factored, c.fq[k] if c.fq else None)
            X = pr.apply(pnc, X, coeffs[0])
        out = X
    else:
        X0, Q, K = X, None, len(c.sched)
        for k, coeffs in enumerate(c.sched):
            if A2 is None and degs[k] >= 2:
                A2 = pr.mm(A, A)
            pnc = _poly_nc(pr, A, A2, coeffs, c.factored, c.fq[k] if c.fq else None)
            if Q is None:
                Q = pnc.clone()
                Q.diagonal().add_(coeffs[0])
            else:
                Q = pr.store(coeffs[0] * Q + pr.mm(pnc, Q))
            A2 = None
            if k in c.restart and k < K - 1:     # restart: X ← Q·X, A ← X Xᵀ, Q ← I
                X0 = pr.apply(Q, X0)
                A, Q = pr.aat(X0), None
            elif k < K - 1:
                B = pr.store(coeffs[0] * A + pr.mm(pnc, A))   # P·A
                A = pr.store(coeffs[0] * B + pr.mm(pnc, B))   # P·A·P
        out = pr.apply(Q, X0)
    out = out.float()
    return out.T if tall else out


def muon_reference(G: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch.optim.Muon's algorithm (same code path as _zeropower_via_newtonschulz) in `dtype`."""
    X = G.to(dtype)
    tall = G.shape[0] > G.shape[1]
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=1e-7)
    a, b, cc = MUON
    for _ in range(5):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=cc)
        X = torch.addmm(X, B, X, beta=a)
    X = X.float()
    return X.T if tall else X


# --------------------------------------------------------------------------------------------
# Matrices and measures
# --------------------------------------------------------------------------------------------
SHAPES = [(1152, 384), (384, 384), (1536, 384), (384, 1536)]
FAMILIES = ("gaussian", "powerlaw", "cond1e4")


def make(shape, family, gen):
    m, n = shape
    k = min(m, n)
    if family == "gaussian":
        return torch.randn(m, n, generator=gen, dtype=torch.float64)
    if family == "rank16":
        return torch.randn(m, 16, generator=gen, dtype=torch.float64) @ torch.randn(16, n, generator=gen, dtype=torch.float64)
    if family == "zero":
        return torch.zeros(m, n, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    if family == "powerlaw":
        s = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    else:
        s = torch.logspace(0, -4, k, dtype=torch.float64)
    return (u * s) @ v.T


@dataclass
class Case:
    family: str
    shape: tuple
    G: torch.Tensor        # float32 input (what an optimizer holds)
    U: torch.Tensor
    V: torch.Tensor
    keep: torch.Tensor     # σ_i ≥ 1e-3 σ_max


def cases(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for fam in FAMILIES + ("rank16", "zero"):
        for shape in SHAPES:
            if fam == "zero" and shape != SHAPES[0]:
                continue
            G64 = make(shape, fam, gen)
            G = G64.float()
            u, s, vh = torch.linalg.svd(G.double(), full_matrices=False)
            keep = s >= 1e-3 * s[0] if s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
            out.append(Case(fam, shape, G, u, vh.T, keep))
    return out


def measure(O: torch.Tensor, case: Case) -> dict:
    O64 = O.double()
    finite = bool(torch.isfinite(O64).all())
    if case.family == "zero":
        return {"err": float(O64.abs().max()), "smax": float(O64.abs().max()), "finite": finite}
    diag = (case.U * (O64 @ case.V)).sum(0)
    err = float((diag[case.keep] - 1).abs().max())
    smax = float(torch.linalg.matrix_norm(O, 2)) if finite else math.inf
    res = {"err": err, "smax": smax, "finite": finite}
    if case.family == "rank16":  # leakage into the null space: ‖(I − U_r U_rᵀ) O‖₂
        Ur = case.U[:, case.keep]
        res["leak"] = float(torch.linalg.matrix_norm((O64 - Ur @ (Ur.T @ O64)).float(), 2))
    return res


# --------------------------------------------------------------------------------------------
def candidates() -> list[Cand]:
    C = []
    C.append(Cand("Muon (torch.optim, 5×quintic, ‖·‖_F)", (MUON,) * 5, norm="fro", form="direct", torch_muon=True,
                  note="bf16 only: torch.optim._muon._zeropower_via_newtonschulz"))
    C.append(Cand("Muon (same alg., reimpl.)", (MUON,) * 5, norm="fro", form="direct",
                  note="fp32 row = Muon's algorithm in fp32"))
    C.append(Cand("PolarExpress 5 (normgraph table)", POLAR_EXPRESS, norm="fro", safety=1.02, form="direct"))
    C.append(Cand("Q3 fit, auto, fp32 loop", Q3_L2_5E_3, loop="fp32"))
    C.append(Cand("Q4 fit, direct, bf16", Q4_L2_5E_3, form="direct"))
    C.append(Cand("Q4 fit, auto, fp32 loop", Q4_L2_5E_3, loop="fp32"))
    C.append(Cand("N3 fit, auto, bf16 loop (plain Gram)", N3_L2_5E_3))
    C.append(Cand("N3 fit, direct, bf16, monomial", N3_L2_5E_3, form="direct", factored=False))
    C.append(Cand("N3 fit, auto, fp32 loop", N3_L2_5E_3, loop="fp32"))
    C.append(Cand("N3 fit, auto, fp32 loop, split QX", N3_L2_5E_3, loop="fp32", qx="split"))
    C.append(Cand("N3c5 fit, auto, fp32 loop", N3_L2_5E_3_C5, loop="fp32"))
    C.append(Cand("N3c5 fit, auto, fp32 loop, fp16 QX", N3_L2_5E_3_C5, loop="fp32", qx="fp16"))
    C.append(Cand("N3c5 fit, auto, fp32/tf32(direct) loop, fp16 QX", N3_L2_5E_3_C5, loop="fp32", loop_direct="tf32", qx="fp16"))
    C.append(Cand("N3c5 fit, direct, tf32 loop, fp16 PX", N3_L2_5E_3_C5, form="direct", loop="tf32", qx="fp16"))
    C.append(Cand("N3c5 fit, direct, bf16", N3_L2_5E_3_C5, form="direct"))
    C.append(Cand("N3c10 fit, auto, fp32 loop, fp16 QX", N3_L2_5E_3_C10, loop="fp32", qx="fp16"))
    C.append(Cand("N3c10 fit, auto, tf32 loop, fp16 QX", N3_L2_5E_3_C10, loop="tf32", qx="fp16"))
    C.append(Cand("N3c10 fit, auto, fp32 loop, split QX", N3_L2_5E_3_C10, loop="fp32", qx="split"))
    C.append(Cand("N3c10 fit, gram+restart@1, fp32 loop", N3_L2_5E_3_C10, form="gram", loop="fp32", restart=(0,)))
    C.append(Cand("C2N2 fit, auto, fp32 loop", C2N2_L2_5E_3, loop="fp32"))
    C.append(Cand("N3C1 fit ℓ=1e-3, auto, fp32 loop", N3C1_L1E_3, loop="fp32"))
    C.append(Cand("Turbo-Muon-like: AOL + Muon 4 steps", (MUON,) * 4, norm="aol", form="direct"))
    C.append(Cand("AOL + Q4 fit direct", Q4_L2_5E_3, norm="aol", form="direct"))
    for c in C:
        c.fq = [factor_quartic(s) if len(s) == 5 else None for s in c.sched]
    return C


def layer_ratio(c: Cand, split_qkv: bool, sym: bool = False) -> float:
    shapes = ([(384, 384)] * 3 if split_qkv else [(1152, 384)]) + [(384, 384), (1536, 384), (384, 1536)]
    muon = Cand("Muon", ())
    return sum(flops(c, *s, sym=sym) for s in shapes) / sum(flops(muon, *s, sym=sym) for s in shapes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="substrings of candidate names to run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print every matrix's err and σ_max")
    args = ap.parse_args()
    print(f"# ns_candidates: torch {torch.__version__}, CPU {platform.processor() or platform.machine()}, "
          f"threads {torch.get_num_threads()} (single-threaded timings), seed {args.seed}")
    cs = cases(args.seed)
    cands = [c for c in candidates() if not args.only or any(o in c.name for o in args.only)]
    layer = [torch.randn(*s, generator=torch.Generator().manual_seed(1)) for s in SHAPES]
    rows = []
    for c in cands:
        ratio = (layer_ratio(c, False), layer_ratio(c, True), layer_ratio(c, False, sym=True), layer_ratio(c, True, sym=True))
        forms = ",".join("G" if pick_form(c, *s) == "gram" else "D" for s in SHAPES)
        per_shape = "/".join(f"{flops(c, *s) / (5 * (2 * min(s)**2 * max(s) + min(s)**3)):.2f}" for s in SHAPES)
        for dtype in (torch.float32, torch.bfloat16):
            if c.torch_muon and dtype == torch.float32:
                continue
            worst = {f: 0.0 for f in FAMILIES + ("rank16",)}
            smax_cond = smax_all = leak = 0.0
            zero_ok, finite = True, True
            for case in cs:
                if c.name.startswith("Muon (same"):
                    O = muon_reference(case.G, dtype)
                else:
                    O = orthogonalize(c, case.G, dtype)
                r = measure(O, case)
                if args.verbose:
                    print(f"    {c.name[:30]:30s} {str(dtype)[6:]:8s} {case.family:9s} {case.shape}: err {r['err']:.4f} "
                          f"σmax {r['smax']:.4f}" + (f" leak {r['leak']:.2e}" if "leak" in r else ""))
                finite &= r["finite"]
                if case.family == "zero":
                    zero_ok &= r["finite"] and r["err"] == 0.0
                    continue
                worst[case.family] = max(worst[case.family], r["err"])
                smax_all = max(smax_all, r["smax"])
                if case.family == "cond1e4":
                    smax_cond = max(smax_cond, r["smax"])
                if case.family == "rank16":
                    leak = max(leak, r["leak"])
            # timing: the whole layer, median of repeats
            ts = []
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                for G in layer:
                    if c.name.startswith("Muon (same"):
                        muon_reference(G, dtype)
                    else:
                        orthogonalize(c, G, dtype)
                ts.append(time.perf_counter() - t0)
            t = statistics.median(ts[1:])
            rows.append((c.name, str(dtype)[6:], ratio, per_shape, forms, worst, smax_cond, smax_all, leak, zero_ok, finite, t))
            print(f"{c.name:44s} {str(dtype)[6:]:8s} FLOPs/Muon layer {ratio[0]:.3f} (QKV split {ratio[1]:.3f}; sym {ratio[2]:.3f}/{ratio[3]:.3f}) "
                  f"per-shape {per_shape} [{forms}] | err gauss {worst['gaussian']:.3f} power {worst['powerlaw']:.3f} "
                  f"cond {worst['cond1e4']:.3f} rank16 {worst['rank16']:.3f} | σmax cond {smax_cond:.3f} all {smax_all:.3f} "
                  f"| leak16 {leak:.2e} zero→0 {zero_ok} finite {finite} | {t * 1e3:.1f} ms/layer", flush=True)
    # markdown table
    base = {r[1]: r[-1] for r in rows if r[0].startswith("Muon (torch")}
    base32 = {r[1]: r[-1] for r in rows if r[0].startswith("Muon (same")}
    print("\n| candidate | dtype | FLOPs/Muon layer (QKV whole / split) | same, symmetric products at ½ | per shape 1152×384/384²/1536×384/384×1536 "
          "| err gauss | err power | err cond1e4 | err rank16 | σmax cond | σmax all | ms/layer (1 thread) | time/Muon bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    tb = base.get("bfloat16") or base32.get("bfloat16") or rows[0][-1]
    for (name, dt, ratio, per, forms, w, sc, sa, lk, zok, fin, t) in rows:
        print(f"| {name} | {dt} | {ratio[0]:.3f} / {ratio[1]:.3f} | {ratio[2]:.3f} / {ratio[3]:.3f} | {per} [{forms}] | {w['gaussian']:.3f} | {w['powerlaw']:.3f} "
              f"| {w['cond1e4']:.3f} | {w['rank16']:.3f} | {sc:.3f} | {sa:.3f} | {t * 1e3:.1f} | {t / tb:.2f} |")


if __name__ == "__main__":
    main()
