"""Generate a duality-map function specialised to one architecture.

Why generate source instead of looping over atoms at run time: the architecture is known
ahead of time, so same-shaped matrices can be stacked and orthogonalized by one batched
Newton–Schulz, every per-atom scale becomes a literal, and the result is plain Python that
a person can read (`print(opt.source)`) and `torch.compile` can fuse. The emitted function
takes the gradients as a list in atom order and returns the updates in the same order.
"""
from __future__ import annotations

import hashlib
import json
import linecache
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import dual
from .layout import atom_parts
from .normgraph import Atom, NormGraph

#: (dtype, device) of one gradient, as strings, e.g. ("float32", "cpu").
Spec = tuple[str, str]
COMPILE_MODES = ("default", "eager", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).replace("torch.", "")


def _work_dtype(device: str, dtype: torch.dtype | str | None) -> torch.dtype:
    """The Newton–Schulz compute dtype for gradients on `device` (`dtype` forces it)."""
    return dual.compute_dtype(torch.device(device), _dtype(str(dtype)) if dtype else None)


def spec_of(t: torch.Tensor) -> Spec:
    """The (dtype, device) pair that the generated code is specialised on."""
    return _dtype_name(t.dtype), str(t.device)


@dataclass
class _Group:
    """Atoms dualised together: same map, same matrix shape, same dtype and device."""

    dual: str
    rows: int
    cols: int
    dtype: str
    device: str
    #: (gradient index, atom or part of one, (dim, start, size) of the part or None)
    members: list[tuple[int, Atom, tuple[int, int, int] | None]] = field(default_factory=list)


def _as_list(atoms: Sequence[Atom] | NormGraph | dict[str, Atom]) -> list[Atom]:
    if isinstance(atoms, NormGraph):
        return list(atoms.atoms.values())
    if isinstance(atoms, dict):
        return list(atoms.values())
    return list(atoms)


def _groups(atoms: list[Atom], specs: list[Spec]) -> list[_Group]:
    groups: dict[tuple, _Group] = {}
    for i, (atom, (dt, dev)) in enumerate(zip(atoms, specs)):
        dual.check_atom(atom)
        for where, piece in atom_parts(atom) if atom.dual == "orthogonalize" else [(None, atom)]:
            rows, cols = piece.options["matrix"][1:] if atom.dual == "orthogonalize" else (0, 0)
            key = (atom.dual, rows, cols, dt, dev)
            groups.setdefault(key, _Group(atom.dual, rows, cols, dt, dev)).members.append((i, piece, where))
    return list(groups.values())


def _lit(x: float) -> str:
    """A float literal that round-trips exactly (the baked constants must equal the math)."""
    return repr(float(x))


def _shape(s: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(v)) for v in s) + ("," if len(s) == 1 else "") + ")"


def _identity(perm: Sequence[int]) -> bool:
    return list(perm) == list(range(len(perm)))


def _is_plain(atom: Atom) -> bool:
    """True when the matrix view is a single plain reshape (one matrix, no permutation)."""
    return atom.options["matrix"][0] == 1 and _identity(atom.options["perm"])


def _source(i: int, where: tuple[int, int, int] | None) -> str:
    """grads[i], or the slice of it that one part of a split atom covers."""
    return f"grads[{i}]" if where is None else f"grads[{i}].narrow({where[0]}, {where[1]}, {where[2]})"


def _out_name(i: int, where: tuple[int, int, int] | None) -> str:
    return f"u{i}" if where is None else f"u{i}_{where[1]}"


def _view_in(i: int, atom: Atom, batched: bool, where: tuple[int, int, int] | None = None) -> str:
    """grads[i] as (rows, cols) when stacking plain matrices, else as (B, rows, cols)."""
    o = atom.options
    b, r, c = o["matrix"]
    src = _source(i, where)
    if _is_plain(atom):
        if not batched:
            return src if tuple(atom.shape) == (r, c) else f"{src}.reshape({r}, {c})"
        return f"{src}.reshape(1, {r}, {c})"
    if _identity(o["perm"]):
        return src if tuple(atom.shape) == (b, r, c) else f"{src}.reshape({b}, {r}, {c})"
    return (f"{src}.reshape{_shape(o['pre_shape'])}.permute{_shape(o['perm'])}"
            f".reshape({b}, {r}, {c})")


def _view_out(expr: str, atom: Atom, batched: bool) -> str:
    """Inverse of `_view_in`: back to the parameter's shape (no-op text when already there)."""
    o = atom.options
    if _is_plain(atom):
        same = not batched and tuple(atom.shape) == tuple(o["matrix"][1:])
        return expr if same else f"{expr}.reshape{_shape(atom.shape)}"
    if _identity(o["perm"]):
        return expr if tuple(atom.shape) == tuple(o["matrix"]) else f"{expr}.reshape{_shape(atom.shape)}"
    perm = list(o["perm"])
    inv = [perm.index(k) for k in range(len(perm))]
    permuted = [o["pre_shape"][p] for p in perm]
    return f"{expr}.reshape{_shape(permuted)}.permute{_shape(inv)}.reshape{_shape(atom.shape)}"


def _names(members: list[tuple[int, Atom, tuple[int, int, int] | None]], width: int = 88) -> list[str]:
    lines, cur = [], "#   "
    for k, (_, a, _) in enumerate(members):
        piece = a.name + ("," if k < len(members) - 1 else "")
        if len(cur) + len(piece) > width and cur.strip() != "#":
            lines.append(cur.rstrip())
            cur = "#   "
        cur += piece + " "
    lines.append(cur.rstrip())
    return lines


def _emit_orthogonalize(gi: int, g: _Group, orthogonalizer: str, work: torch.dtype, method: str,
                        out: list[str]) -> None:
    n_mats = sum(a.options["matrix"][0] for _, a, _ in g.members)
    tall = g.rows > g.cols
    gram = orthogonalizer == "newton-schulz" and dual.use_gram(g.rows, g.cols, work, method)
    how = ("exact SVD" if orthogonalizer == "svd" else
           f"Newton–Schulz on the {'transposes (tall)' if tall else 'matrices'}, Gram {min(g.rows, g.cols)}²"
           + (", iterated in Gram form" if gram else ""))
    out.append(f"    # group {gi}: orthogonalize {n_mats} × ({g.rows}×{g.cols}) {g.dtype} on {g.device}, {how}")
    out.extend("    " + line for line in _names(g.members))
    plain = all(_is_plain(a) for _, a, _ in g.members)
    views = [_view_in(i, a, not plain, where) for i, a, where in g.members]
    if tall:  # stack the transposes: one copy makes the wide layout contiguous for the bmm calls
        views = [f"{v}.mT" for v in views]
    if len(views) == 1:
        stacked = views[0] + (".unsqueeze(0)" if plain else "")
    else:
        joined = ",\n        ".join(views)
        stacked = f"torch.{'stack' if plain else 'cat'}([\n        {joined},\n    ])"
    out.append(f"    g{gi} = {stacked}")
    if orthogonalizer == "svd":
        out.append(f"    o{gi} = _svd_orthogonalize(g{gi}){'.mT' if tall else ''}")
    else:
        cast_in = f".to(torch.{_dtype_name(work)})" if _dtype_name(work) != g.dtype else ""
        cast_out = f".to(torch.{g.dtype})" if cast_in else ""
        form = ", gram_form=True" if gram else ""
        out.append(f"    o{gi} = _newton_schulz(g{gi}{cast_in}{form}){'.mT' if tall else ''}{cast_out}")
    start = 0
    for i, a, where in g.members:
        b = a.options["matrix"][0]
        piece = f"o{gi}[{start}]" if plain else f"o{gi}[{start}:{start + b}]"
        start += b
        _, r, c = a.options["matrix"]
        note = f"  # budget {a.budget:.4g} · sqrt({r}/{c})" + (
            f" / {a.options.get('norm_scale', 1.0):g}" if a.options.get("norm_scale", 1.0) != 1 else "")
        scaled = f"{piece} * {_lit(dual.matrix_scale(a))}"
        viewed = _view_out(f"({scaled})", a, batched=not plain)
        out.append(f"    {_out_name(i, where)} = {scaled if viewed == f'({scaled})' else viewed}{note}")


_ELEMENTWISE = {
    "sign": ("torch.sign({g})", "ℓ∞ steepest direction"),
    "rms_normalize": ("_rms_normalize({g})", "whole tensor scaled to RMS 1"),
    "row_normalize": ("_row_normalize({g})", "each row scaled to RMS 1, zero rows stay 0"),
}


def _emit_elementwise(gi: int, g: _Group, out: list[str]) -> None:
    expr, why = _ELEMENTWISE[g.dual]
    out.append(f"    # group {gi}: {g.dual} ({why}) × {len(g.members)}, {g.dtype} on {g.device}")
    out.extend("    " + line for line in _names(g.members))
    for i, a, _ in g.members:
        out.append(f"    u{i} = {expr.format(g=f'grads[{i}]')} * {_lit(a.budget)}")


def _ns_helper(coeffs: dual.Coefficients, safety: float, eps: float, label: str, fused: bool) -> list[str]:
    lines = [f"# {label}: (a, b, c) per step; X ← a·X + (b·G + c·G²)·X with G = X·Xᵀ",
             "_COEFFICIENTS = ("]
    lines += [f"    ({_lit(a)}, {_lit(b)}, {_lit(c)})," for a, b, c in coeffs]
    lines += [
        ")",
        "",
        "",
        "def _newton_schulz(x, gram_form=False):",
        '    """(B, m, n) with m <= n → ≈ U Vᵀ; Frobenius-normalised first so σ ≤ 1 (0 stays 0)."""',
        "    x = _unit_max(x, dim=(-2, -1))  # huge entries would overflow the norm to a zero update",
        "    norm = torch.linalg.matrix_norm(x, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))",
        f"    x = x / (norm * {_lit(safety)} + {_lit(eps)}).to(x.dtype)",
        "    if gram_form:  # same polynomial, looping on the m×m Gram matrix (normgraph.dual.gram_newton_schulz)",
        "        return _gram_newton_schulz(x, _COEFFICIENTS)",
        "    for a, b, c in _COEFFICIENTS:",
        "        gram = torch.bmm(x, x.mT)",
        *(["        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·G + c·G² in one cuBLAS call",
            "        x = torch.baddbmm(x, poly, x, beta=a)"] if fused else
          ["        poly = b * gram + c * torch.bmm(gram, gram)  # plain bmm: some CPUs run baddbmm slowly",
           "        x = a * x + torch.bmm(poly, x)"]),
        "    return x",
        "",
        "",
    ]
    return lines


def generate_source(atoms: Sequence[Atom] | NormGraph | dict[str, Atom], *, specs: Sequence[Spec] | None = None,
                    orthogonalizer: str = "newton-schulz", ns_steps: int = 5,
                    coefficients: str | Sequence = "quintic", dtype: torch.dtype | str | None = None,
                    ns_method: str = "auto", eps: float = 1e-7, name: str = "dualize") -> str:
    """The Python source of `def <name>(grads): ...` for these atoms (see module docstring)."""
    atoms = _as_list(atoms)
    specs = list(specs) if specs is not None else [(a.dtype, "cpu") for a in atoms]
    if len(specs) != len(atoms):
        raise ValueError(f"got {len(specs)} gradient specs for {len(atoms)} atoms")
    if orthogonalizer not in dual.ORTHOGONALIZERS:
        raise ValueError(f"unknown orthogonalizer {orthogonalizer!r}; use one of {dual.ORTHOGONALIZERS}")
    coeffs, safety = dual.ns_schedule(coefficients, ns_steps)
    dual.check_ns_method(ns_method)
    groups = _groups(atoms, specs)
    ortho = [g for g in groups if g.dual == "orthogonalize"]
    label = (coefficients if isinstance(coefficients, str) else "explicit") + f", {ns_steps} steps"
    out = [f"# Generated by normgraph.codegen: duality map for {len(atoms)} parameters in {len(groups)} groups.",
           f"# orthogonalizer: {orthogonalizer}" + (f" ({label})" if orthogonalizer == "newton-schulz" else ""),
           "# Each update has norm `budget` in its atom's norm; grads and updates are in atom order.",
           "import torch", "", ""]
    if ortho and orthogonalizer == "newton-schulz":
        fused = all(g.device.startswith("cuda") for g in ortho)
        out += _ns_helper(coeffs, safety, eps, label, fused)
    out.append(f"def {name}(grads):")
    if not atoms:
        out.append("    return []")
    for gi, g in enumerate(groups):
        if g.dual == "orthogonalize":
            work = _work_dtype(g.device, dtype)
            _emit_orthogonalize(gi, g, orthogonalizer, work, ns_method, out)
        else:
            _emit_elementwise(gi, g, out)
    for i, atom in enumerate(atoms):  # split atoms: their parts back into one update
        parts = atom.options.get("parts") if atom.dual == "orthogonalize" else None
        if parts:
            pieces = ", ".join(f"u{i}_{p['start']}" for p in parts)
            out.append(f"    u{i} = torch.cat([{pieces}], dim={parts[0]['dim']})  # {atom.name}, {len(parts)} parts")
    if atoms:
        items = ", ".join(f"u{i}" for i in range(len(atoms)))
        out.append(f"    return [{items}]")
    return "\n".join(out) + "\n"


def exec_source(source: str, name: str = "dualize") -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """Exec generated source under a fake filename registered in linecache (so tracebacks,
    `inspect.getsource` and torch.compile's error messages show the generated lines)."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    filename = f"<normgraph-{name}-{digest}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {
        "torch": torch,
        "_svd_orthogonalize": dual.svd_orthogonalize,
        "_gram_newton_schulz": dual.gram_newton_schulz,
        "_rms_normalize": dual.rms_normalize,
        "_unit_max": dual.unit_max,
        "_row_normalize": dual.row_normalize,
        "__name__": f"normgraph.generated.{name}",
    }
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace[name]


def _describe(err: BaseException) -> str:
    """One line naming the compiler error (and the backend's own error it wraps, if any)."""
    root = getattr(err, "inner_exception", None) or err.__cause__
    text = f"{type(err).__name__}: {err}"
    if root is not None and root is not err:
        text = f"{type(err).__name__} ← {type(root).__name__}: {root}"
    return " ".join(text.split())[:400]


class DualityMap:
    """The generated function, compiled with torch.compile when that works.

    `compile_mode="eager"` (or `backend=None`) never compiles. Otherwise the first call
    compiles; if compilation fails the map warns once, naming the error, and runs eagerly
    from then on (same results, slower).
    """

    def __init__(self, eager: Callable, source: str, compile_mode: str = "default",
                 backend: str | None = "inductor") -> None:
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile_mode {compile_mode!r}; use one of {COMPILE_MODES}")
        self.eager = eager
        self.source = source
        self.compile_mode = compile_mode if backend is not None else "eager"
        self.compile_error: str | None = None
        self._compiled: Callable | None = None
        if self.compile_mode != "eager":
            mode = None if compile_mode == "default" else compile_mode
            self._compiled = torch.compile(eager, backend=backend, mode=mode, dynamic=False)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def __call__(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._compiled is not None:
            try:
                return self._compiled(grads)
            except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
                self.compile_error = _describe(err)
                self._compiled = None
                warnings.warn(f"normgraph: torch.compile of the duality map failed ({self.compile_error}); "
                              "running it eagerly instead. Pass compile_mode='eager' to skip compiling.",
                              RuntimeWarning, stacklevel=2)
        return self.eager(grads)

    def __repr__(self) -> str:
        return f"DualityMap(compiled={self.compiled}, mode={self.compile_mode!r})"


def generate(atoms: Sequence[Atom] | NormGraph | dict[str, Atom], *, orthogonalizer: str = "newton-schulz",
             ns_steps: int = 5, coefficients: str | Sequence = "quintic",
             dtype: torch.dtype | str | None = None, ns_method: str = "auto",
             specs: Sequence[Spec] | None = None, compile_mode: str = "default",
             backend: str | None = "inductor", name: str = "dualize") -> tuple[str, DualityMap]:
    """Source and callable of the duality map for `atoms` (gradients given by `specs`).

    `dtype` forces the Newton–Schulz compute dtype (default bf16 on CUDA, fp32 on CPU);
    `ns_method` picks the direct or Gram form per group (`dual.use_gram`).
    """
    source = generate_source(atoms, specs=specs, orthogonalizer=orthogonalizer, ns_steps=ns_steps,
                             coefficients=coefficients, dtype=dtype, ns_method=ns_method, name=name)
    return source, DualityMap(exec_source(source, name), source, compile_mode, backend)


def cache_key(atoms: Sequence[Atom], specs: Sequence[Spec], **options: Any) -> str:
    """Everything baked into the generated code; equal keys ⇒ the same function."""
    rows = [(a.name, a.dual, list(a.shape), a.budget, a.options, list(s)) for a, s in zip(atoms, specs)]
    opts = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in sorted(options.items())}
    return json.dumps([rows, opts], sort_keys=True, default=str)


def flops(atoms: Sequence[Atom], ns_steps: int, specs: Sequence[Spec] | None = None,
          dtype: torch.dtype | str | None = None, ns_method: str = "auto") -> float:
    """Matmul FLOPs of one Newton–Schulz pass over the orthogonalized atoms (for rooflines),
    counted for the form (direct or Gram) that the generated code uses."""
    specs = list(specs) if specs is not None else [(a.dtype, "cpu") for a in atoms]
    total = 0.0
    for a, (_, dev) in zip(atoms, specs):
        if a.dual != "orthogonalize":
            continue
        work = _work_dtype(dev, dtype)
        for _, piece in atom_parts(a):
            b, r, c = piece.options["matrix"]
            total += b * dual.ns_flops(r, c, ns_steps, dual.use_gram(r, c, work, ns_method))
    return total


__all__ = ["generate", "generate_source", "exec_source", "DualityMap", "cache_key", "spec_of", "flops"]
