"""Duality maps: turn a gradient into the unit-norm steepest-descent direction of its atom.

Eager reference implementations, used by the tests, by the generated code (for the SVD
orthogonalizer) and by anyone who wants one atom's update without compiling anything.
Every map here sends a zero gradient to a zero update and never produces NaN from a
finite input: a zero update is the right answer when there is nothing to descend along.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .layout import as_matrices, atom_parts, from_matrices, view_problem
from .normgraph import Atom

Coefficients = tuple[tuple[float, float, float], ...]

#: Muon's quintic (Jordan et al. 2024): one (a, b, c) reused every step. It maximises the
#: slope at zero, so singular values land in roughly [0.7, 1.2] rather than exactly 1.
QUINTIC: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

#: Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932), one minimax-optimal
#: quintic per step, computed for l=1e-3, num_iters=5, safety_factor_eps=2e-2, cushion=0.02.
#: Source: the paper's reference code (github.com/NoahAmsel/PolarExpress, `optimal_composition`)
#: and the identical table in KellerJordan/modded-nanogpt. We checked these digits by re-running
#: the paper's Remez construction with those parameters (agreement to ~1e-15); see
#: docs/newton_schulz.md. The safety factor 1.02 is already divided into every step but the
#: last (a/s, b/s³, c/s⁵); the paper applies the same factor to the input normalisation,
#: which `POLAR_EXPRESS_SAFETY` does below.
POLAR_EXPRESS: Coefficients = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02

SCHEDULES = ("quintic", "polar-express")
ORTHOGONALIZERS = ("newton-schulz", "svd")
DUALS = ("orthogonalize", "row_normalize", "sign", "rms_normalize")
#: How the Newton–Schulz polynomial is evaluated: "direct" iterates on X (m×n); "gram"
#: iterates on the m×m Gram matrix and touches X only twice; "auto" picks "gram" where it is
#: both cheaper and as accurate (see `use_gram`).
NS_METHODS = ("auto", "direct", "gram")


def ns_schedule(coefficients: str | Sequence[Sequence[float]], steps: int) -> tuple[Coefficients, float]:
    """Per-step (a, b, c) and the input safety factor for a named or explicit schedule.

    Polar Express with more than 5 steps repeats its last polynomial (as the paper's code
    does); with fewer it uses the first `steps`.
    """
    if steps < 1:
        raise ValueError(f"ns_steps must be >= 1, got {steps}")
    if isinstance(coefficients, str):
        if coefficients == "quintic":
            return (QUINTIC,) * steps, 1.0
        if coefficients == "polar-express":
            pe = POLAR_EXPRESS[:steps] + (POLAR_EXPRESS[-1],) * max(0, steps - len(POLAR_EXPRESS))
            return pe, POLAR_EXPRESS_SAFETY
        raise ValueError(f"unknown ns_coefficients {coefficients!r}; use one of {SCHEDULES} "
                         "or a list of (a, b, c) tuples")
    coeffs = tuple(tuple(float(v) for v in abc) for abc in coefficients)
    if any(len(abc) != 3 for abc in coeffs):
        raise ValueError("explicit ns_coefficients must be (a, b, c) triples")
    if len(coeffs) == 1:
        coeffs = coeffs * steps
    if len(coeffs) != steps:
        raise ValueError(f"got {len(coeffs)} coefficient triples for ns_steps={steps}")
    return coeffs, 1.0  # type: ignore[return-value]


def compute_dtype(device: torch.device, dtype: torch.dtype | None = None) -> torch.dtype:
    """bf16 on CUDA (tensor cores; NS tolerates it), fp32 elsewhere (CPU bf16 is slow and lossy)."""
    if dtype is not None:
        return dtype
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_ns_method(method: str) -> None:
    """Raise a clear error for a name that is not one of `NS_METHODS`."""
    if method not in NS_METHODS:
        raise ValueError(f"unknown ns_method {method!r}; use one of {NS_METHODS}")


def use_gram(rows: int, cols: int, dtype: torch.dtype, method: str = "auto") -> bool:
    """Whether to run Newton–Schulz in Gram form for (rows × cols) matrices in `dtype`.

    With m = min, n = max, the direct form costs (2n/m + 1)·m³ multiply-adds per step; the
    Gram form costs about 3.4·m³ per step plus 2n·m² once, so it wins from n ≥ 2m (1.5× fewer
    FLOPs at n = 3m, 1.8× at 4m). It is used only in float32/float64 ("gram" in half precision
    is an error): the Gram matrix is updated recursively (A ← P·A·P) instead of being
    recomputed from X, and in bfloat16 that recursion drifts (σ_max of the result reached 1.67
    with the quintic and 12.0 with Polar Express on a 768×3072 input of condition number 1e4,
    against 1.20 and 1.14 for the direct form); in float32 the Gram form stays within 4e-4 of
    the float64 iteration (spectral norm) there (benchmarks/ns_forms.py, docs/newton_schulz.md).
    """
    check_ns_method(method)
    full_precision = dtype in (torch.float32, torch.float64)
    if method == "gram" and not full_precision:
        raise ValueError(f"ns_method='gram' needs float32 or float64 compute, not {dtype}: in half precision "
                         "the Gram recursion drifts (σ_max up to 12 where the direct form gives 1.14). Pass "
                         "compute_dtype=torch.float32, or ns_method='auto' to use the Gram form only where it is safe")
    if method != "auto":
        return method == "gram"
    m, n = sorted((rows, cols))
    return full_precision and n >= 2 * m


def direct_newton_schulz(y: torch.Tensor, coeffs: Coefficients, fused: bool) -> torch.Tensor:
    """X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ, per step, on a (B, m, n) batch with m <= n."""
    for a, b, c in coeffs:
        gram = torch.bmm(y, y.mT)
        if fused:  # cuBLAS folds the scaled add into the matmul epilogue
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
            y = torch.baddbmm(y, poly, y, beta=a)  # a·X + (b·A + c·A²)·X
        else:  # on some CPUs baddbmm takes a slow path in bf16 (2-5×); plain bmm never does
            poly = b * gram + c * torch.bmm(gram, gram)
            y = a * y + torch.bmm(poly, y)
    return y


def gram_newton_schulz(y: torch.Tensor, coeffs: Coefficients) -> torch.Tensor:
    """The direct iteration X ← P(XXᵀ)·X, rewritten on the Gram matrix (B, m, n), m <= n.

    Every P_k is a polynomial in A_k = X_k X_kᵀ, so X_k = Q_k X_0 with Q_k = P_k ⋯ P_1 and
    A_{k+1} = P_k A_k P_k: the loop runs on m×m matrices and X is read twice (A_0, Q·X_0).
    """
    gram = torch.bmm(y, y.mT)
    q = None
    for k, (a, b, c) in enumerate(coeffs):
        poly = b * gram + c * torch.bmm(gram, gram)
        poly.diagonal(dim1=-2, dim2=-1).add_(a)  # P = a·I + b·A + c·A²
        q = poly if q is None else torch.bmm(poly, q)
        if k + 1 < len(coeffs):
            gram = torch.bmm(torch.bmm(poly, gram), poly)
    return torch.bmm(q, y)


def ns_flops(rows: int, cols: int, steps: int, gram: bool) -> float:
    """Matmul FLOPs of one Newton–Schulz pass over one (rows × cols) matrix."""
    m, n = sorted((rows, cols))
    if gram:  # A_0 and Q·X_0; per step A² and all but the first P·Q; all but the last P·A·P
        return 2.0 * (2 * m * m * n + m**3 * (steps + (steps - 1) + 2 * (steps - 1)))
    return 2.0 * steps * (2 * m * m * n + m**3)


def newton_schulz(x: torch.Tensor, steps: int = 5, coefficients: str | Sequence = "quintic",
                  dtype: torch.dtype | None = None, eps: float = 1e-7, method: str = "auto") -> torch.Tensor:
    """Approximate U Vᵀ of each matrix in a (..., m, n) batch by an odd polynomial iteration.

    Normalising by the Frobenius norm bounds σ_max by 1 so the iteration converges; the
    iteration runs on the wide orientation so the Gram matrix is min(m, n)² (fewer FLOPs),
    and in Gram form (`method`, see `use_gram`) where that is cheaper still.
    """
    coeffs, safety = ns_schedule(coefficients, steps)
    out_dtype = x.dtype
    tall = x.shape[-2] > x.shape[-1]
    y = x.to(compute_dtype(x.device, dtype))
    if tall:
        y = y.mT
    batch_shape = y.shape[:-2]
    y = y.reshape(-1, *y.shape[-2:])
    y = unit_max(y, dim=(-2, -1))  # huge entries would overflow the Frobenius norm to a zero update
    norm = torch.linalg.matrix_norm(y, keepdim=True, dtype=torch.promote_types(y.dtype, torch.float32))
    y = y / (norm * safety + eps).to(y.dtype)
    if use_gram(*y.shape[-2:], y.dtype, method):
        y = gram_newton_schulz(y, coeffs)
    else:
        y = direct_newton_schulz(y, coeffs, fused=y.device.type == "cuda")
    y = y.reshape(*batch_shape, *y.shape[-2:])
    if tall:
        y = y.mT
    return y.to(out_dtype)


def svd_orthogonalize(x: torch.Tensor) -> torch.Tensor:
    """Exact U Vᵀ of each matrix in a (..., m, n) batch, in float32 or wider.

    Directions with (numerically) zero singular value map to 0, so a zero or rank-deficient
    gradient gives no motion along directions it does not see (matching Newton–Schulz).
    """
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    tol = s.amax(dim=-1, keepdim=True) * max(x.shape[-2:]) * torch.finfo(work.dtype).eps
    keep = (s > tol).to(work.dtype)
    return ((u * keep.unsqueeze(-2)) @ vh).to(x.dtype)


def orthogonalize(x: torch.Tensor, orthogonalizer: str = "newton-schulz", steps: int = 5,
                  coefficients: str | Sequence = "quintic", dtype: torch.dtype | None = None,
                  method: str = "auto") -> torch.Tensor:
    """Dispatch on the orthogonalizer's name (see `ORTHOGONALIZERS`)."""
    if orthogonalizer == "svd":
        return svd_orthogonalize(x)
    if orthogonalizer == "newton-schulz":
        return newton_schulz(x, steps, coefficients, dtype, method=method)
    raise ValueError(f"unknown orthogonalizer {orthogonalizer!r}; use one of {ORTHOGONALIZERS}")


def matrix_scale(atom: Atom) -> float:
    """budget · sqrt(fan_out/fan_in) / norm_scale: turns a U Vᵀ batch into a norm-`budget` update."""
    _, rows, cols = atom.options["matrix"]
    return atom.budget * math.sqrt(rows / cols) / atom.options.get("norm_scale", 1.0)


def check_atom(atom: Atom) -> None:
    """Raise a clear error if the atom cannot be dualised as it stands."""
    if atom.dual not in DUALS:
        raise ValueError(f"parameter {atom.name!r}: unknown duality map {atom.dual!r} (kind "
                         f"{atom.kind!r}); use one of {DUALS}, e.g. via "
                         f"normgraph.register_kind({atom.kind!r}, dual=..., norm=..., mass=...)")
    if atom.dual == "orthogonalize":
        views = [sub.options for _, sub in atom_parts(atom)]
        if not all("matrix" in v for v in views):
            raise ValueError(f"parameter {atom.name!r}: kind {atom.kind!r} is orthogonalized but its "
                             "atom has no matrix view; build options with layout.matrix_options(...)")
        problem = view_problem(atom)
        if problem:
            raise ValueError(f"parameter {atom.name!r}: {problem}; re-run normgraph.analyze")


def unit_max(x: torch.Tensor, dim: tuple[int, ...] | int | None = None) -> torch.Tensor:
    """x divided by its largest |entry| (over `dim`, all-zero slices stay 0): squaring it can
    neither overflow (fp16 above 256, fp32 above 1e19) nor underflow to a zero norm."""
    top = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    return x / torch.where(top > 0, top, torch.ones_like(top))


def row_normalize(g: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Each row (one embedding vector) scaled to RMS 1; all-zero rows stay 0. Computed in
    float32 or wider after scaling each row by its largest entry, so any finite gradient in
    any dtype gives rows of RMS exactly 1 (no overflow to a zero update)."""
    rows = unit_max(g.reshape(g.shape[0], -1), dim=1)
    wide = rows.to(torch.promote_types(rows.dtype, torch.float32))
    rms = wide.pow(2).mean(dim=1, keepdim=True).sqrt()
    safe = torch.where(rms > eps, rms, torch.ones_like(rms))
    return (wide / safe).to(g.dtype).reshape(g.shape)


def rms_normalize(g: torch.Tensor) -> torch.Tensor:
    """Whole tensor scaled to RMS 1; a zero tensor stays 0 (overflow-safe as `row_normalize`)."""
    wide = unit_max(g).to(torch.promote_types(g.dtype, torch.float32))
    rms = wide.pow(2).mean().sqrt()
    return (wide / torch.where(rms > 0, rms, torch.ones_like(rms))).to(g.dtype)


def dualize_atom(atom: Atom, grad: torch.Tensor, *, orthogonalizer: str = "svd", ns_steps: int = 5,
                 coefficients: str | Sequence = "quintic", dtype: torch.dtype | None = None,
                 ns_method: str = "auto") -> torch.Tensor:
    """The update for one atom: dual(grad) × budget, of norm `budget` in the atom's norm."""
    check_atom(atom)
    if tuple(grad.shape) != atom.shape:
        raise ValueError(f"parameter {atom.name!r}: gradient shape {tuple(grad.shape)} does not match "
                         f"the atom's {atom.shape}; re-run analyze on this model")
    if atom.dual == "orthogonalize" and atom.options.get("parts"):
        pieces = [dualize_atom(sub, grad.narrow(*where), orthogonalizer=orthogonalizer, ns_steps=ns_steps,
                               coefficients=coefficients, dtype=dtype, ns_method=ns_method)
                  for where, sub in atom_parts(atom)]
        return torch.cat(pieces, dim=atom.options["parts"][0]["dim"])
    if atom.dual == "orthogonalize":
        m = as_matrices(grad, atom.options)
        o = orthogonalize(m, orthogonalizer, ns_steps, coefficients, dtype, ns_method)
        return from_matrices(o * matrix_scale(atom), atom.options, atom.shape)
    if atom.dual == "row_normalize":
        return row_normalize(grad) * atom.budget
    if atom.dual == "sign":
        return torch.sign(grad) * atom.budget
    return rms_normalize(grad) * atom.budget
