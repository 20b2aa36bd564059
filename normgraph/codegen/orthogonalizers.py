"""Orthogonalizers: maps from a batch of wide matrices to (approximately) their U Vᵀ.

One registry, `ORTHOGONALIZERS`, holds every orthogonalizer the duality map can use; the
built-ins (Newton–Schulz in direct or Gram form, exact SVD) are registered the same way a
user's is (`normgraph.register_orthogonalizer`). An entry's `fn` is the one definition of
the algorithm: the generated code calls it (with its per-shape settings written out as
literals) and so does the eager path (`codegen.dual.orthogonalize`).

Every built-in sends a zero matrix to zero and never produces NaN from a finite input.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.registry import Registry

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
#: The default schedule: Polar Express is more accurate than Muon's quintic at the same
#: matmul count (docs/performance.md) and trained every model we measured as well or
#: better (docs/results.md §7).
DEFAULT_SCHEDULE = "polar-express"
#: How the Newton–Schulz polynomial is evaluated: "direct" iterates on X (m×n); "gram"
#: iterates on the m×m Gram matrix and touches X only twice; "auto" picks "gram" where it is
#: both cheaper and as accurate (see `use_gram`).
NS_METHODS = ("auto", "direct", "gram")
#: Added to the normaliser so that a zero matrix stays exactly 0 (never 0/0).
NS_EPS = 1e-7
#: In half precision the Gram form re-forms X ← Q·X and A ← X·Xᵀ every this many steps. Its
#: recursion A ← P·A·P and the product Q = P_k⋯P_1 compound bf16 rounding: with no restart
#: σ_max of the result reached 5.5e6 (Polar Express, 256×1024 power-law input). Re-formed
#: every 2 steps it kept the direct form's σ_max on Gaussian, power-law, cond-1e4 and rank-8
#: inputs from 256×1024 to 1024×4096 (1.150 against 1.144 with Polar Express, 1.200 against
#: 1.205 with the quintic); every 3 steps Polar Express reached 1.41 there
#: (benchmarks/ns_gram_restarts.py; docs/newton_schulz.md, "The Gram form in half precision").
#: In float32 the unbroken recursion stays within 4e-4 of float64, so it never restarts.
HALF_PRECISION_GRAM_RESTART = 2
#: "auto" uses the half-precision Gram form only on matrices with at least this many rows (the
#: shorter side). Below it even the restarted form drifts on ill-conditioned inputs: σ_max
#: 1.23 on a 32×64 power-law input, 1.17-1.26 on row-scaled Gaussians of 16 to 64 rows, where
#: the direct form gives 1.15 (benchmarks/ns_gram_restarts.py). 128×256 matched; 256 keeps a
#: margin, and small matrices cost little anyway.
HALF_PRECISION_GRAM_MIN = 256


# ---------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Orthogonalizer:
    """One registered orthogonalizer.

    `fn(x, **settings)` maps a (B, m, n) batch with m <= n, in one of `dtypes`, to its
    orthogonalized batch of the same shape and dtype. `settings(options, m, n, dtype,
    device_type)` gives the keyword arguments for one matrix shape (literals: they are
    written into the generated code); `flops(m, n, settings)` counts one matrix's matmul
    FLOPs; `title` and `describe(settings, m)` say what runs (a comment in the code).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    dtypes: tuple[torch.dtype, ...] | None = None
    settings: Callable[[Any, int, int, torch.dtype, str], dict[str, Any]] | None = None
    flops: Callable[[int, int, dict[str, Any]], float] | None = None
    describe: Callable[[dict[str, Any], int], str] | None = None
    title: str = ""

    def settings_for(self, options: Any, m: int, n: int, dtype: torch.dtype, device_type: str) -> dict[str, Any]:
        return dict(self.settings(options, m, n, dtype, device_type)) if self.settings else {}

    def work_dtype(self, device_type: str, forced: torch.dtype | None, grad_dtype: torch.dtype | None = None) -> torch.dtype:
        """The dtype the batch is computed in: the forced one (refused if this entry does not
        accept it); else the gradient's own dtype if the entry lists it; else the device
        default (`compute_dtype`) if accepted; else the first listed dtype."""
        if forced is not None:
            if self.dtypes is not None and forced not in self.dtypes:
                raise ValueError(f"orthogonalizer {self.name!r} computes in {_names(self.dtypes)}, not {forced}; "
                                 "pass one of those as compute_dtype (or leave it unset)")
            return forced
        if self.dtypes is not None and grad_dtype in self.dtypes:
            return grad_dtype
        default = compute_dtype(torch.device(device_type))
        if self.dtypes is None or default in self.dtypes:
            return default
        return self.dtypes[0]


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


#: Names the generated code already uses for other globals (`_<name>` would shadow them).
RESERVED_NAMES = ("row_normalize", "rms_normalize", "sign", "torch")


def _check(name: str, entry: Orthogonalizer) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"an orthogonalizer needs a non-empty string name, got {name!r}")
    if name.replace("-", "_") in RESERVED_NAMES:
        raise ValueError(f"register_orthogonalizer({name!r}): the name is taken by the generated code's "
                         f"other helpers ({', '.join(RESERVED_NAMES)}); choose another")
    if not callable(entry.fn):
        raise TypeError(f"register_orthogonalizer({name!r}): fn must be callable, got {type(entry.fn).__name__}")


ORTHOGONALIZERS: Registry[str, Orthogonalizer] = Registry("orthogonalizer", check=_check)


def register_orthogonalizer(name: str, fn: Callable[..., torch.Tensor], *,
                            flops: Callable[[int, int, dict[str, Any]], float] | None = None,
                            dtypes: Sequence[torch.dtype] | None = None,
                            settings: Callable[..., dict[str, Any]] | None = None,
                            describe: Callable[[dict[str, Any], int], str] | None = None,
                            title: str = "") -> Orthogonalizer:
    """Make `fn` available as ``normgraph.compile(..., orthogonalizer=name)``.

    `fn` maps a batch (B, m, n), m <= n, to its orthogonalized batch (tall matrices are
    transposed before and after, so `fn` only sees wide ones). `flops(m, n, settings)` gives
    one matrix's matmul FLOPs (for `codegen.flops` and benchmarks); `dtypes` lists the compute
    dtypes `fn` accepts (others are refused if forced; the default is the device's, else the
    first listed); `settings` returns per-shape keyword arguments for `fn`; `title` and
    `describe(settings, m)` label it in the generated code.
    """
    entry = Orthogonalizer(name, fn, tuple(dtypes) if dtypes is not None else None, settings, flops, describe,
                           title or name)
    return ORTHOGONALIZERS.register(name, entry)


def lookup(name: str) -> Orthogonalizer:
    return ORTHOGONALIZERS.lookup(name, "register one with normgraph.register_orthogonalizer(name, fn)")


# ---------------------------------------------------------------------------------------
# Newton–Schulz


def ns_schedule(coefficients: str | Sequence[Sequence[float]], steps: int) -> tuple[Coefficients, float]:
    """Per-step (a, b, c) and the input safety factor for a named or explicit schedule.

    Polar Express with more than 5 steps repeats its last polynomial (as the paper's code
    does); with fewer it uses the first `steps`.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"ns_steps must be an integer >= 1, got {steps!r}")
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
    if not all(math.isfinite(v) for abc in coeffs for v in abc):
        raise ValueError(f"explicit ns_coefficients must be finite, got {coeffs}")
    if len(coeffs) == 1:
        coeffs = coeffs * steps
    if len(coeffs) != steps:
        raise ValueError(f"got {len(coeffs)} coefficient triples for ns_steps={steps}")
    return coeffs, 1.0  # type: ignore[return-value]


def compute_dtype(device: torch.device, dtype: torch.dtype | None = None) -> torch.dtype:
    """The default compute dtype: bf16 on CUDA (tensor cores) and on CPUs with native bf16
    dot products (`cpu_has_fast_bf16`), fp32 elsewhere. In bf16 each schedule keeps its fp32
    accuracy (within 0.006 in every family; torch.optim.Muon also runs in bf16) at ~2.7× the
    fp32 Gram form's speed on an AVX512-BF16 CPU (docs/performance.md); without native bf16 a
    CPU emulates it slowly."""
    if dtype is not None:
        return dtype
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return torch.float32


#: `torch.cpu.get_capabilities()` flags of native bf16 matmul (x86 AVX512-BF16, AMX).
FAST_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (a fixed fact of the machine, so every rank
    of a homogeneous job chooses alike). Set NORMGRAPH_CPU_BF16=0 (or 1) to override."""
    forced = os.environ.get("NORMGRAPH_CPU_BF16")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "False")
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # older torch: no capability query
        return False
    return any(bool(caps.get(flag)) for flag in FAST_BF16_CPU_FLAGS)


def check_ns_method(method: str) -> None:
    """Raise a clear error for a name that is not one of `NS_METHODS`."""
    if method not in NS_METHODS:
        raise ValueError(f"unknown ns_method {method!r}; use one of {NS_METHODS}")


def gram_restarts(dtype: torch.dtype, steps: int) -> tuple[int, ...]:
    """The steps before which the Gram form re-forms X and its Gram matrix in `dtype`: none in
    float32/float64, every `HALF_PRECISION_GRAM_RESTART` steps in half precision."""
    if dtype in (torch.float32, torch.float64):
        return ()
    return tuple(range(HALF_PRECISION_GRAM_RESTART, steps, HALF_PRECISION_GRAM_RESTART))


def use_gram(rows: int, cols: int, dtype: torch.dtype, method: str = "auto", steps: int = 5) -> bool:
    """Whether to run Newton–Schulz in Gram form for (rows × cols) matrices in `dtype`.

    With m = min, n = max, the direct form costs (2n/m + 1)·m³ multiply-adds per step; the
    Gram form costs about 3.4·m³ per step plus 2n·m² once, and 4n·m² more per restart in half
    precision (`gram_restarts`). So in float32 it wins from n ≥ 2m (1.5× fewer FLOPs at n = 3m,
    1.8× at 4m); in bf16, re-formed every 2 steps, by 1.2× at 3m and 1.3× at 4m. "auto" picks
    it where n ≥ 2m and its FLOP count (`ns_flops`) is below the direct form's, and in half
    precision only from m = `HALF_PRECISION_GRAM_MIN`. In float32 it stays within 4e-4 of the
    float64 iteration (spectral norm); in bf16, with its restarts and from that size, it keeps
    the direct form's σ bands (benchmarks/ns_forms.py, docs/newton_schulz.md).
    """
    check_ns_method(method)
    if method != "auto":
        return method == "gram"
    m, n = sorted((rows, cols))
    restarts = gram_restarts(dtype, steps)
    if restarts and m < HALF_PRECISION_GRAM_MIN:
        return False
    return n >= 2 * m and ns_flops(m, n, steps, True, len(restarts)) < ns_flops(m, n, steps, False)


def unit_max(x: torch.Tensor, dim: tuple[int, ...] | int | None = None) -> torch.Tensor:
    """x divided by its largest |entry| (over `dim`, all-zero slices stay 0): squaring it can
    neither overflow (fp16 above 256, fp32 above 1e19) nor underflow to a zero norm."""
    if x.numel() == 0:  # an empty shard: nothing to scale (and amax of nothing is an error)
        return x
    top = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    return x / torch.where(top > 0, top, torch.ones_like(top))


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


def gram_newton_schulz(y: torch.Tensor, coeffs: Coefficients, restarts: tuple[int, ...] = ()) -> torch.Tensor:
    """The direct iteration X ← P(XXᵀ)·X, rewritten on the Gram matrix (B, m, n), m <= n.

    Every P_k is a polynomial in A_k = X_k X_kᵀ, so X_k = Q_k X_0 with Q_k = P_k ⋯ P_1 and
    A_{k+1} = P_k A_k P_k: the loop runs on m×m matrices and X is read twice (A_0, Q·X_0).
    Before each step k in `restarts`, X ← Q·X and A ← X·Xᵀ are formed afresh, so rounding in
    the recursion compounds over one segment only (needed in half precision: `gram_restarts`).
    """
    gram = torch.bmm(y, y.mT)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    q = None
    for k, (a, b, c) in enumerate(coeffs):
        if k in restarts:  # re-form X and its Gram matrix from the input
            y = torch.bmm(q, y)
            gram = torch.bmm(y, y.mT)
            q = None
        poly = b * gram + c * torch.bmm(gram, gram) + a * eye  # P = a·I + b·A + c·A² (out of place)
        q = poly if q is None else torch.bmm(poly, q)
        if k + 1 < len(coeffs) and k + 1 not in restarts:
            gram = torch.bmm(torch.bmm(poly, gram), poly)
    return torch.bmm(q, y)


def newton_schulz_batch(x: torch.Tensor, coefficients: Coefficients, safety: float = 1.0, eps: float = NS_EPS,
                        gram_form: bool = False, fused: bool = False, gram_restarts: tuple[int, ...] = ()) -> torch.Tensor:
    """(B, m, n), m <= n → ≈ U Vᵀ: the registered "newton-schulz" orthogonalizer.

    Normalising by the Frobenius norm (× `safety`) bounds σ_max by 1 so the iteration
    converges; dividing by the largest entry first keeps that norm from overflowing to a
    zero update. Then the polynomial runs directly or in Gram form (`use_gram`), re-formed
    before the steps in `gram_restarts` (`gram_restarts(dtype, steps)`).
    """
    x = unit_max(x, dim=(-2, -1))  # a new tensor (or an empty one): the caller's batch is let go here
    norm = torch.linalg.matrix_norm(x, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    x = x.div_((norm * safety + eps).to(x.dtype))  # in place on unit_max's result: one work tensor fewer
    if gram_form:
        return gram_newton_schulz(x, coefficients, gram_restarts)
    return direct_newton_schulz(x, coefficients, fused)


def ns_flops(rows: int, cols: int, steps: int, gram: bool, restarts: int = 0) -> float:
    """Matmul FLOPs of one Newton–Schulz pass over one (rows × cols) matrix; `restarts`: how
    many times the Gram form re-forms X and its Gram matrix (`gram_newton_schulz`)."""
    m, n = sorted((rows, cols))
    if not gram:
        return 2.0 * steps * (2 * m * m * n + m**3)
    segments = restarts + 1
    # A_0 and Q·X_0, plus Q·X and X·Xᵀ per restart; per step A²; per segment all but its first
    # P·Q and all but its last P·A·P (two matmuls)
    return 2.0 * ((2 + 2 * restarts) * m * m * n + m**3 * (steps + 3 * (steps - segments)))


def _ns_settings(options: Any, m: int, n: int, dtype: torch.dtype, device_type: str) -> dict[str, Any]:
    coeffs, safety = ns_schedule(options.ns_coefficients, options.ns_steps)
    gram = use_gram(m, n, dtype, options.ns_method, len(coeffs))
    settings = {"coefficients": coeffs, "safety": safety, "eps": NS_EPS, "gram_form": gram,
                "fused": device_type == "cuda"}
    restarts = gram_restarts(dtype, len(coeffs)) if gram else ()
    if restarts:  # only in half precision, so float32 maps keep their generated code
        settings["gram_restarts"] = restarts
    return settings


def _ns_describe(s: dict[str, Any], m: int) -> str:
    restarts = s.get("gram_restarts", ())
    restart = f", re-formed from X before step{'s' * (len(restarts) > 1)} {', '.join(map(str, restarts))}" if restarts else ""
    return f"Gram {m}²" + (", iterated in Gram form" + restart if s["gram_form"] else "")


register_orthogonalizer(
    "newton-schulz", newton_schulz_batch, settings=_ns_settings, describe=_ns_describe, title="Newton–Schulz",
    flops=lambda m, n, s: ns_flops(m, n, len(s["coefficients"]), s["gram_form"], len(s.get("gram_restarts", ()))))


def newton_schulz(x: torch.Tensor, steps: int = 5, coefficients: str | Sequence = DEFAULT_SCHEDULE,
                  dtype: torch.dtype | None = None, eps: float = NS_EPS, method: str = "auto") -> torch.Tensor:
    """Approximate U Vᵀ of each matrix in a (..., m, n) batch (eager; any orientation).

    Runs on the wide orientation so the Gram matrix is min(m, n)², in Gram form where
    `use_gram` says so, in `dtype` (default: `compute_dtype(x.device)`).
    """
    coeffs, safety = ns_schedule(coefficients, steps)
    work = compute_dtype(x.device, dtype)
    gram = use_gram(*sorted(x.shape[-2:]), work, method, steps)
    restarts = gram_restarts(work, len(coeffs)) if gram else ()

    def wide(y: torch.Tensor) -> torch.Tensor:
        return newton_schulz_batch(y, coeffs, safety, eps, gram, fused=y.device.type == "cuda", gram_restarts=restarts)
    return on_wide_batches(x, wide, work)


# ---------------------------------------------------------------------------------------
# Exact SVD


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


def _svd_flops(m: int, n: int, settings: dict[str, Any]) -> float:
    """A rough count for a thin SVD plus U·Vᵀ (Golub–Van Loan: ≈ 4m²n + 22m³ for bidiagonalisation
    and accumulation), so rooflines of the exact reference are not reported as free."""
    return 2.0 * (4 * m * m * n + 22 * m**3) + 2.0 * m * m * n


register_orthogonalizer("svd", svd_orthogonalize, dtypes=(torch.float32, torch.float64), flops=_svd_flops,
                        title="exact SVD")


# ---------------------------------------------------------------------------------------
# Orientation and batching, shared by the eager path


def on_wide_batches(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], work: torch.dtype) -> torch.Tensor:
    """Apply a (B, m, n), m <= n map to a (..., rows, cols) tensor of any orientation: transpose
    tall matrices, flatten the batch, cast to `work` and back."""
    out_dtype = x.dtype
    tall = x.shape[-2] > x.shape[-1]
    y = x.mT if tall else x
    batch_shape = y.shape[:-2]
    y = fn(y.reshape(-1, *y.shape[-2:]).to(work))
    y = y.reshape(*batch_shape, *y.shape[-2:])
    return (y.mT if tall else y).to(out_dtype)
