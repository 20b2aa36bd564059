"""Emit the Python source of a duality map specialised to one architecture.

Why generate source instead of looping over atoms at run time: the architecture is known
ahead of time, so same-shaped matrices can be stacked and orthogonalized by one batched
call, every per-atom scale becomes a literal, and the result is plain Python that a person
can read (`print(opt.source)`) and `torch.compile` can fuse. The emitted function takes the
gradients as a list in atom order and returns the updates in the same order.

Like torch.fx's `PythonCode`, `generate_source` returns the source together with the
globals it needs (the registered orthogonalizer's function, the elementwise duals), so the
algorithms are defined once (`orthogonalizers.py`, `dual.py`) and the text only wires them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import linecache
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.graph import Atom, NormGraph
from ..core.layout import ViewOp, atom_parts, matrix_view, parameter_view
from .dual import ELEMENTWISE, matrix_scale
from .options import MapOptions, options_from
from .orthogonalizers import Orthogonalizer, lookup
from .plan import Group, Spec, as_atom_list, plan
from .runtime import DualityMap

#: `max_batch_bytes="auto"`: a stacked batch holds at most this fraction of the bytes of all the
#: map's gradients, clamped to [`AUTO_BATCH_FLOOR`, `AUTO_BATCH_CEILING`]. A batch's work tensors
#: are 3-7× its bytes (fewest in bf16), so the step's transient stays well under half the
#: parameters' bytes (docs/performance.md, "Memory of a step").
AUTO_BATCH_FRACTION = 1 / 16
#: Small models keep one batch per shape (below 1 GiB of gradients nothing is split)...
AUTO_BATCH_FLOOR = 64 * 2**20
#: ... and large ones a transient of a few GiB whatever their size.
AUTO_BATCH_CEILING = 2**30


@dataclass
class PythonCode:
    """Generated source and the globals it runs with (as `torch.fx.graph.PythonCode`)."""

    src: str
    globals: dict[str, Any] = field(default_factory=dict)


def _lit(x: float) -> str:
    """A float literal that round-trips exactly (the baked constants must equal the math)."""
    return repr(float(x))


def _shape(s: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(v)) for v in s) + ("," if len(s) == 1 else "") + ")"


def _is_plain(atom: Atom) -> bool:
    """True when the matrix view is a single plain reshape (one matrix, no permutation)."""
    return atom.options["matrix"][0] == 1 and list(atom.options["perm"]) == list(range(len(atom.options["perm"])))


def _text(program: list[ViewOp]) -> str:
    """A view program (`core.layout`) as method calls: `.reshape(3, 8, 4).permute(0, 2, 1)`."""
    return "".join(f".{op}{_shape(dims)}" for op, dims in program)


def _source(i: int, where: tuple[int, int, int] | None) -> str:
    """grads[i], or the slice of it that one part of a split atom covers."""
    return f"grads[{i}]" if where is None else f"grads[{i}].narrow({where[0]}, {where[1]}, {where[2]})"


def _view_in(i: int, atom: Atom, batched: bool, where: tuple[int, int, int] | None = None) -> str:
    """grads[i] as (rows, cols) when stacking plain matrices, else as (B, rows, cols)."""
    two_d = _is_plain(atom) and not batched
    return _source(i, where) + _text(matrix_view(atom.options, atom.shape, two_d))


def _view_out(expr: str, atom: Atom, batched: bool) -> str:
    """Inverse of `_view_in`: back to the parameter's shape (no-op text when already there)."""
    two_d = _is_plain(atom) and not batched
    return expr + _text(parameter_view(atom.options, atom.shape, two_d))


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


def _ident(name: str) -> str:
    """A Python identifier for a registered name ("newton-schulz" → "newton_schulz")."""
    out = re.sub(r"\W", "_", name)
    return out if out and not out[0].isdigit() else f"o_{out}"


def _literal(v: Any, indent: str = "") -> str:
    """A literal that round-trips exactly; tuples of tuples one row per line."""
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return repr(v)
    if isinstance(v, float):
        return _lit(v)
    if isinstance(v, (tuple, list)):
        if v and all(isinstance(r, (tuple, list)) for r in v):
            rows = "".join(f"{indent}    {_literal(r)},\n" for r in v)
            return f"(\n{rows}{indent})"
        return "(" + ", ".join(_literal(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    raise TypeError(f"orthogonalizer setting {v!r} ({type(v).__name__}) cannot be written as a literal")


def _call_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    except (TypeError, ValueError):  # builtins without a signature
        return {}


@dataclass
class _OrthoPlan:
    """One orthogonalizer's settings across the map: what every group shares (bound once) and
    what each group adds (both passed at its call)."""

    entry: Orthogonalizer
    works: dict[int, torch.dtype]
    settings: dict[int, dict[str, Any]]
    common: dict[str, Any]


def _ortho_plan(entry: Orthogonalizer, groups: list[tuple[int, Group]], options: MapOptions) -> _OrthoPlan:
    works, settings = {}, {}
    for gi, g in groups:
        works[gi] = entry.work_dtype(g.device_type, options.dtype, getattr(torch, g.dtype))
        settings[gi] = entry.settings_for(options, min(g.rows, g.cols), max(g.rows, g.cols), works[gi], g.device_type)
    keys = set.intersection(*(set(s) for s in settings.values())) if settings else set()
    first = next(iter(settings.values()), {})
    common = {k: first[k] for k in sorted(keys) if all(s[k] == first[k] for s in settings.values())}
    return _OrthoPlan(entry, works, settings, common)


def _bind(p: _OrthoPlan, out: list[str], glob: dict[str, Any]) -> tuple[str, str]:
    """Name the registered function and bind the settings every group shares (tuples as
    constants); return the function's global name and those settings as call text. Settings
    equal to the function's defaults are left out."""
    ident = _ident(p.entry.name)
    fn_global = f"_orthogonalizer_{ident}"
    glob[fn_global] = p.entry.fn
    qual = f"{getattr(p.entry.fn, '__module__', '?')}.{getattr(p.entry.fn, '__qualname__', '?')}"
    out.append(f"# orthogonalizer {p.entry.name!r} ({p.entry.title}): {fn_global} is {qual}, called on each")
    out.append("# batch, (B, m, n) with m <= n, with the batch built in the call: nothing else holds it, so")
    out.append("# the iteration frees it as soon as it has its own copy. Settings shared by every group:")
    defaults = _call_defaults(p.entry.fn)
    bound = []
    for k, v in p.common.items():
        if k in defaults and defaults[k] == v:
            continue
        if isinstance(v, (tuple, list)):
            const = f"_{_ident(k).upper()}"
            out.append(f"{const} = {_literal(v)}")
            bound.append(f"{k}={const}")
        else:
            bound.append(f"{k}={_literal(v)}")
    out += ["", ""]
    return fn_global, "".join(", " + b for b in bound)


def _member_bytes(a: Atom, g: Group) -> int:
    """Bytes of one member's matrices in the gradients' dtype (what stacking it adds to a batch)."""
    b, r, c = a.options["matrix"]
    return b * r * c * _itemsize(g.dtype)


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def chunks(g: Group, cap: int | None) -> list[list[tuple[int, Atom, tuple[int, int, int] | None]]]:
    """A group's members in consecutive batches whose stacked gradients hold at most `cap`
    bytes (None: one batch), as even as the members allow. A member larger than the cap is
    a batch of its own (its matrices are never split)."""
    members = g.members
    sizes = [_member_bytes(a, g) for _, a, _ in members]
    total = sum(sizes)
    if cap is None or total <= cap:
        return [list(members)]
    count = -(-total // cap)  # ceil(total / cap) batches at least
    out: list[list] = [[]]
    held, left = 0, total
    for m, size in zip(members, sizes):
        target = left / max(1, count - len(out) + 1)  # an even share of what is left
        if out[-1] and (held + size > cap or abs(held + size - target) > abs(held - target)):
            left -= held
            out.append([])
            held = 0
        out[-1].append(m)
        held += size
    return out


def _target(i: int, where: tuple[int, int, int] | None) -> str:
    """Where an update is written: out[i], or the slice of it that one part of a split atom covers."""
    return f"out[{i}]" if where is None else f"out[{i}].narrow({where[0]}, {where[1]}, {where[2]})"


def _emit_orthogonalize(gi: int, g: Group, p: _OrthoPlan, call: tuple[str, str], out: list[str],
                        cap: int | None = None, after_batch: Callable[[int], None] = lambda size: None) -> None:
    """Emit the group's batches, calling `after_batch(stacked bytes)` after each."""
    tall = g.rows > g.cols
    work, settings = p.works[gi], p.settings[gi]
    detail = p.entry.describe(settings, min(g.rows, g.cols)) if p.entry.describe else ""
    how = f"{p.entry.title} on the {'transposes (tall)' if tall else 'matrices'}" + (f", {detail}" if detail else "")
    batches = chunks(g, cap)
    split = f", in {len(batches)} batches of at most {cap} bytes (max_batch_bytes)" if len(batches) > 1 else ""
    out.append(f"    # group {gi}: orthogonalize {g.matrices} × ({g.rows}×{g.cols}) {g.dtype} on {g.device}, {how}{split}")
    out.extend("    " + line for line in _names(g.members))
    plain = all(_is_plain(a) for _, a, _ in g.members)
    work_name = str(work).replace("torch.", "")
    cast_in = f".to(torch.{work_name})" if work_name != g.dtype else ""
    # back to the gradients' dtype once per batch: the iteration's work tensors are freed by then
    cast_out = f".to(torch.{g.dtype})" if cast_in else ""
    defaults = _call_defaults(p.entry.fn)
    extra = "".join(f", {k}={_literal(v)}" for k, v in settings.items()
                    if k not in p.common and not (k in defaults and defaults[k] == v))
    for members in batches:
        # each gradient is cast to the work dtype before stacking, so the batch is built in
        # that dtype (no full-precision copy of it stays alive during the iteration)
        views = [_view_in(i, a, not plain, where) + (".mT" if tall else "") + cast_in for i, a, where in members]
        fn_global, common = call
        if len(views) == 1:
            stacked = views[0] + (".unsqueeze(0)" if plain else "")
            out.append(f"    o{gi} = {fn_global}({stacked}{common}{extra}){'.mT' if tall else ''}{cast_out}")
        else:
            joined = "".join(f"        {v},\n" for v in views)
            out.append(f"    o{gi} = {fn_global}(torch.{'stack' if plain else 'cat'}([\n{joined}    ]){common}{extra})"
                       + (".mT" if tall else "") + cast_out)
        start = 0
        for i, a, where in members:
            b = a.options["matrix"][0]
            piece = f"o{gi}[{start}]" if plain else f"o{gi}[{start}:{start + b}]"
            start += b
            _, r, c = a.options["matrix"]
            note = f"  # budget {a.budget:.4g} · sqrt({r}/{c})" + (
                f" / {a.options.get('norm_scale', 1.0):g}" if a.options.get("norm_scale", 1.0) != 1 else "")
            viewed, scale = _view_out(piece, a, batched=not plain), _lit(matrix_scale(a))
            out.append(f"    torch.mul({viewed}, {scale}, out={_target(i, where)}){note}")
        out.append(f"    del o{gi}")
        after_batch(sum(_member_bytes(a, g) for _, a, _ in members))


def _emit_elementwise(gi: int, g: Group, out: list[str], glob: dict[str, Any], cap: int | None = None) -> None:
    fn, why = ELEMENTWISE[g.dual]
    call = "torch.sign" if fn is torch.sign else f"_{g.dual}"
    if fn is not torch.sign:
        glob[call] = fn
    out.append(f"    # group {gi}: {g.dual} ({why}) × {len(g.members)}, {g.dtype} on {g.device}")
    out.extend("    " + line for line in _names(g.members))
    for i, a, _ in g.members:
        rows = a.shape[0] if a.shape else 1
        size = math.prod(a.shape) * _itemsize(g.dtype)
        if g.dual != "rms_normalize" and cap is not None and size > cap and rows > 1:
            # row by row is exact for both (each row's update depends on that row only)
            block = max(1, cap * rows // size)
            out.append(f"    for r in range(0, {rows}, {block}):  # blocks of rows: max_batch_bytes")
            out.append(f"        torch.mul({call}(grads[{i}][r:r + {block}]), {_lit(a.budget)}, "
                       f"out=out[{i}][r:r + {block}])")
        else:
            out.append(f"    torch.mul({call}(grads[{i}]), {_lit(a.budget)}, out=out[{i}])")


def batch_cap(atoms: Sequence[Atom], specs: Sequence[Spec], options: MapOptions) -> int | None:
    """The byte cap on one stacked batch (`MapOptions.max_batch_bytes`): "auto" is
    `AUTO_BATCH_FRACTION` of the gradients' bytes within [`AUTO_BATCH_FLOOR`,
    `AUTO_BATCH_CEILING`]; None: no cap."""
    cap = options.max_batch_bytes
    if cap != "auto":
        return cap
    total = sum(math.prod(a.shape) * _itemsize(dt) for a, (dt, _) in zip(atoms, specs))
    return min(max(int(total * AUTO_BATCH_FRACTION), AUTO_BATCH_FLOOR), AUTO_BATCH_CEILING)


def generate_source(atoms: Sequence[Atom] | NormGraph | dict[str, Atom], options: MapOptions | None = None, *,
                    specs: Sequence[Spec] | None = None, name: str = "dualize", **changes: Any) -> PythonCode:
    """The source of `def <name>(grads, out=None): ...` for these atoms, and its globals
    (module docstring). The updates are written into `out` (one tensor per gradient, e.g. the
    gradients themselves: every batch reads its gradients before it writes their updates) or
    into new tensors; same-shaped matrices are stacked in batches of at most
    `options.max_batch_bytes` (`batch_cap`), so the map's work tensors stay near that size."""
    options = options_from(options, changes)
    atoms = as_atom_list(atoms)
    specs = list(specs) if specs is not None else [(a.dtype, "cpu") for a in atoms]
    entry = lookup(options.orthogonalizer)
    groups = plan(atoms, specs)
    ortho = [(gi, g) for gi, g in enumerate(groups) if g.dual == "orthogonalize"]
    glob: dict[str, Any] = {"torch": torch}
    schedule = options.ns_coefficients if isinstance(options.ns_coefficients, str) else "explicit"
    label = f" ({schedule}, {options.ns_steps} steps)" if options.orthogonalizer == "newton-schulz" else ""
    out = [f"# Generated by normgraph.codegen: duality map for {len(atoms)} parameters in {len(groups)} groups.",
           f"# orthogonalizer: {options.orthogonalizer}{label}",
           "# Each update has norm `budget` in its atom's norm; grads and updates are in atom order.",
           "import torch", "", ""]
    oplan = _ortho_plan(entry, ortho, options) if ortho else None
    call = _bind(oplan, out, glob) if oplan else ("", "")
    cap = batch_cap(atoms, specs, options)
    breaks = options.compile_mode != "eager" and options.backend is not None
    out.append(f"def {name}(grads, out=None):")
    out.append('    """Updates in atom order, written into `out` (new tensors if None)."""')
    out.append("    if out is None:")
    out.append("        out = [torch.empty_like(g) for g in grads]")
    held = [0]

    def segment(size: int) -> None:  # compiled: a graph per ~cap bytes of batches, so no graph holds more
        held[0] += size
        if breaks and cap is not None and held[0] >= cap:
            out.append("    torch._dynamo.graph_break()  # max_batch_bytes: the next batches in a graph of their own")
            held[0] = 0

    for gi, g in enumerate(groups):
        if g.dual == "orthogonalize":
            _emit_orthogonalize(gi, g, oplan, call, out, cap, segment)  # type: ignore[arg-type]
        else:
            _emit_elementwise(gi, g, out, glob, cap)
    out.append("    return out")
    return PythonCode("\n".join(out) + "\n", glob)


def exec_code(code: PythonCode, name: str = "dualize") -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """Exec generated code under a fake filename registered in linecache (so tracebacks,
    `inspect.getsource` and torch.compile's error messages show the generated lines)."""
    digest = hashlib.sha1(code.src.encode()).hexdigest()[:12]
    filename = f"<normgraph-{name}-{digest}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace: dict[str, Any] = {**code.globals, "__name__": f"normgraph.generated.{name}"}
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace[name]


def generate(atoms: Sequence[Atom] | NormGraph | dict[str, Atom], options: MapOptions | None = None, *,
             specs: Sequence[Spec] | None = None, name: str = "dualize", **changes: Any) -> tuple[str, DualityMap]:
    """Source and callable of the duality map for `atoms` (gradients given by `specs`).

    `options` (or its fields as keywords: ``orthogonalizer=``, ``ns_steps=``,
    ``compute_dtype=``, ``ns_method=``, ``compile_mode=``, ...) say how it orthogonalizes
    and whether it is compiled.
    """
    options = options_from(options, changes)
    code = generate_source(atoms, options, specs=specs, name=name)
    return code.src, DualityMap(exec_code(code, name), code.src, options.compile_mode, options.backend)


def cache_key(atoms: Sequence[Atom], specs: Sequence[Spec], options: MapOptions | None = None, **changes: Any) -> str:
    """Everything baked into the generated code; equal keys ⇒ the same function."""
    options = options_from(options, changes)
    rows = [(a.name, a.dual, list(a.shape), a.budget, a.options, list(s)) for a, s in zip(atoms, specs)]
    return json.dumps([rows, options.to_dict()], sort_keys=True, default=str)


def flops(atoms: Sequence[Atom], options: MapOptions | None = None, specs: Sequence[Spec] | None = None,
          **changes: Any) -> float:
    """Matmul FLOPs of one pass of the orthogonalizer over the orthogonalized atoms (for
    rooflines), counted by the registered entry for the settings the generated code uses."""
    options = options_from(options, changes)
    entry = lookup(options.orthogonalizer)
    if entry.flops is None:
        raise ValueError(f"orthogonalizer {entry.name!r} was registered without flops=; pass "
                         "register_orthogonalizer(..., flops=lambda m, n, settings: ...) to count it")
    atoms = list(atoms)
    specs = list(specs) if specs is not None else [(a.dtype, "cpu") for a in atoms]
    total = 0.0
    for a, (dt, dev) in zip(atoms, specs):
        if a.dual != "orthogonalize":
            continue
        device_type = torch.device(dev).type
        work = entry.work_dtype(device_type, options.dtype, getattr(torch, dt))
        for _, piece in atom_parts(a):
            b, r, c = piece.options["matrix"]
            m, n = sorted((r, c))
            total += b * entry.flops(m, n, entry.settings_for(options, m, n, work, device_type))
    return total


__all__ = ["generate", "generate_source", "exec_code", "PythonCode", "cache_key", "flops"]
