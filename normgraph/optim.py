"""The optimizer around the generated duality map.

One step: EMA momentum (optionally Nesterov) → the generated duality map (every atom's
update has norm `budget` in its own norm) → W ← W·(1 − lr·wd) − lr·update.

Parameter groups: one group per parameter, in atom order, each carrying the parameter's
`name`, so the modular-norm budget (baked into the map) and the step size (the group's
`lr`, changed freely at run time by you or a torch LR scheduler) stay separate knobs.
Set one parameter's lr with ``opt.group("h.0.mlp.c_fc.weight")["lr"] = 0.05``.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from . import codegen
from .normgraph import Atom, NormGraph

class NormGraphOptimizer(torch.optim.Optimizer):
    """Steepest descent under the modular norm, with momentum and decoupled weight decay.

    Attributes: `norm_graph` (the analysis), `dualize` (the compiled duality map for all
    trainable atoms, gradients in `param_groups` order), `source` (its Python source),
    `last_step_skipped` (True when the last step saw a non-finite gradient and changed
    nothing), `skipped_steps` (how many such steps so far).

    Parameters whose `grad` is None in a step (frozen, unused) are left exactly as they
    are, weight decay included; the map for that subset of atoms is generated once and
    cached. Budgets, shapes, dtypes and devices are baked into the generated code, so
    changing any of them (e.g. ``opt.norm_graph.atoms[n].budget = ...``) regenerates it
    on the next step; changing lr, momentum or weight decay does not.
    """

    def __init__(self, params: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]], norm_graph: NormGraph, *,
                 lr: float = 0.1, momentum: float = 0.95, nesterov: bool = True, weight_decay: float = 0.0,
                 orthogonalizer: str = "newton-schulz", ns_steps: int = 5,
                 ns_coefficients: str | Sequence = "quintic", compute_dtype: torch.dtype | None = None,
                 ns_method: str = "auto", compile_mode: str = "default",
                 backend: str | None = "inductor") -> None:
        if not (math.isfinite(lr) and lr >= 0 and 0 <= momentum < 1
                and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"need a finite lr >= 0, 0 <= momentum < 1, a finite weight_decay >= 0; "
                             f"got lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        named = dict(params.named_parameters() if isinstance(params, torch.nn.Module) else params)
        self.norm_graph = norm_graph
        self.map_options: dict[str, Any] = dict(
            orthogonalizer=orthogonalizer, ns_steps=ns_steps, ns_coefficients=ns_coefficients,
            compute_dtype=compute_dtype, ns_method=ns_method, compile_mode=compile_mode, backend=backend)
        codegen.generate_source([], orthogonalizer=orthogonalizer, ns_steps=ns_steps,
                                coefficients=ns_coefficients, ns_method=ns_method)  # validate options early
        groups = [{"params": [p], "name": name} for name, p in _trainable(named, norm_graph)]
        if not groups:
            raise ValueError("no trainable parameter of the model has an atom in the norm graph; "
                             "re-run normgraph.analyze(model) on this model")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(groups, defaults)
        self.last_step_skipped = False
        self.skipped_steps = 0
        self._maps: dict[str, codegen.DualityMap] = {}
        self._fast: dict[tuple, codegen.DualityMap] = {}
        everything = list(range(len(self.param_groups)))
        self.dualize = self._map_for(everything, [g["params"][0] for g in self.param_groups])

    # -- bookkeeping ---------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name = param_group.get("name")
        if name not in self.norm_graph.atoms:
            raise ValueError(f"param group {name!r} has no atom in the norm graph: every group must be one "
                             "parameter with a 'name' that normgraph.analyze produced")
        if any(g["name"] == name for g in getattr(self, "param_groups", [])):
            raise ValueError(f"parameter {name!r} already has a param group in this optimizer; each atom "
                             "is one group (change its lr with opt.group(name)['lr'] = ...)")
        params = param_group["params"]
        tensors = [params] if isinstance(params, torch.Tensor) else list(params)
        atom = self.norm_graph.atoms[name]
        if len(tensors) != 1 or tuple(tensors[0].shape) != tuple(atom.shape):
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(f"param group {name!r} must hold exactly the one tensor of that atom, of shape "
                             f"{atom.shape}; got {len(tensors)} tensor(s) of shape(s) {shapes}")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load by parameter name, not by position: groups saved in another order are matched
        to the same parameters; a state dict naming other parameters is refused, listing them."""
        saved = state_dict["param_groups"]
        names = [g.get("name") for g in saved]
        mine = [g["name"] for g in self.param_groups]
        if sorted(map(str, names)) != sorted(mine) or len(set(names)) != len(names):
            missing = sorted(set(mine) - set(names))
            extra = sorted(set(map(str, names)) - set(mine))
            raise ValueError("this state dict is for other parameters: "
                             + "; ".join(part for part in (
                                 f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}" if missing else "",
                                 f"unknown {extra[:5]}{' …' if len(extra) > 5 else ''}" if extra else "",
                                 "duplicate names" if len(set(names)) != len(names) else "") if part))
        if names != mine:  # same parameters, another order: reorder the saved groups to ours
            by_name = {g["name"]: g for g in saved}
            state_dict = {**state_dict, "param_groups": [by_name[n] for n in mine]}
        super().load_state_dict(state_dict)

    def atom(self, index: int) -> Atom:
        return self.norm_graph.atoms[self.param_groups[index]["name"]]

    def group(self, name: str) -> dict[str, Any]:
        """The param group (lr, momentum, nesterov, weight_decay) of the parameter `name`."""
        for g in self.param_groups:
            if g["name"] == name:
                return g
        raise KeyError(f"no parameter named {name!r} in this optimizer")

    @property
    def source(self) -> str:
        """Python source of the duality map over all trainable atoms (read it like fx's `.code`)."""
        return self.dualize.source

    def _map_for(self, indices: list[int], tensors: list[torch.Tensor]) -> codegen.DualityMap:
        """The generated map for these atoms and gradient dtypes/devices, generated on a miss."""
        atoms = [self.atom(i) for i in indices]
        specs = [codegen.spec_of(t) for t in tensors]
        fast = (tuple(indices), tuple(specs), tuple((id(a), a.budget, a.shape) for a in atoms))
        hit = self._fast.get(fast)
        if hit is not None:
            return hit
        key = codegen.cache_key(atoms, specs, **self.map_options)
        if key not in self._maps:
            o = self.map_options
            _, fn = codegen.generate(atoms, specs=specs, orthogonalizer=o["orthogonalizer"],
                                     ns_steps=o["ns_steps"], coefficients=o["ns_coefficients"],
                                     dtype=o["compute_dtype"], ns_method=o["ns_method"],
                                     compile_mode=o["compile_mode"], backend=o["backend"])
            self._maps[key] = fn
        self._fast[fast] = self._maps[key]
        if len(indices) == len(self.param_groups):
            self.dualize = self._maps[key]
        return self._maps[key]

    # -- the step --------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = [i for i, g in enumerate(self.param_groups) if g["params"][0].grad is not None]
        self.last_step_skipped = False
        if not live:
            return loss
        bad_lr = [self.param_groups[i]["name"] for i in live if not math.isfinite(self.param_groups[i]["lr"])]
        if bad_lr:  # a scheduler or a hand edit set it after construction
            raise ValueError(f"normgraph: non-finite lr in the param group(s) of {', '.join(bad_lr[:3])}: "
                             f"{self.group(bad_lr[0])['lr']}; "
                             "nothing was changed")
        params = [self.param_groups[i]["params"][0] for i in live]
        grads = [p.grad for p in params]
        sparse = [self.param_groups[i]["name"] for i, g in zip(live, grads) if g.is_sparse]
        if sparse:
            raise RuntimeError(f"normgraph: sparse gradients are not supported ({', '.join(sparse[:3])}): "
                               "build the layer with sparse=False (nn.Embedding(..., sparse=False))")
        if not _all_finite(grads):
            self._skip([self.param_groups[i]["name"] for i, g in zip(live, grads) if not torch.isfinite(g).all()])
            return loss
        directions = self._momentum([self.param_groups[i] for i in live], params, grads)
        updates = self._map_for(live, grads)(directions)
        groups = [self.param_groups[i] for i in live]
        decayed = [(p, 1 - g["lr"] * g["weight_decay"]) for p, g in zip(params, groups) if g["weight_decay"]]
        if decayed:
            torch._foreach_mul_([p for p, _ in decayed], [f for _, f in decayed])
        torch._foreach_add_(params, torch._foreach_mul(updates, [-g["lr"] for g in groups]))
        return loss

    def _momentum(self, groups: list[dict[str, Any]], params: list[torch.Tensor],
                  grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """EMA momentum: buf ← m·buf + (1−m)·g; Nesterov looks ahead: (1−m)·g + m·buf.

        Batched with torch._foreach_* over the parameters that share (momentum, nesterov),
        so the step costs a handful of kernel launches, not a few per parameter.
        """
        out: list[torch.Tensor] = list(grads)
        buckets: dict[tuple[float, bool], list[int]] = {}
        for k, g in enumerate(groups):
            if g["momentum"]:
                buckets.setdefault((g["momentum"], bool(g["nesterov"])), []).append(k)
        for (m, nesterov), idx in buckets.items():
            bufs = []
            for k in idx:
                state = self.state[params[k]]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grads[k])
                bufs.append(state["momentum_buffer"])
            gs = [grads[k] for k in idx]
            torch._foreach_lerp_(bufs, gs, 1 - m)
            looked = torch._foreach_lerp(gs, bufs, m) if nesterov else bufs
            for k, d in zip(idx, looked):
                out[k] = d
        return out

    def _skip(self, bad: list[str]) -> None:
        self.last_step_skipped = True
        self.skipped_steps += 1
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(f"normgraph: non-finite gradient in {shown}; step skipped (no weight or momentum "
                      "changed). Check the loss scale / learning rate.", RuntimeWarning, stacklevel=3)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("last_step_skipped", False)
        self.__dict__.setdefault("skipped_steps", 0)


def _all_finite(grads: list[torch.Tensor]) -> bool:
    """One host sync for the whole model: the ∞-norm is inf/NaN iff some entry is."""
    norms = torch._foreach_norm(grads, math.inf)
    device = norms[0].device
    return bool(torch.stack([n.float().to(device) for n in norms]).isfinite().all())


def _trainable(named: dict[str, torch.nn.Parameter], ng: NormGraph) -> list[tuple[str, torch.nn.Parameter]]:
    """Atoms' parameters that require grad, in atom order; clear errors for mismatches."""
    missing = [n for n in ng.atoms if n not in named]
    if missing and len(missing) < len(ng.atoms):
        raise ValueError(f"parameters {missing[:5]}{' …' if len(missing) > 5 else ''} are in the norm graph but "
                         "not among the parameters given. If you passed a subset: pass all of "
                         "model.named_parameters() (freeze the others with requires_grad_(False) and re-run "
                         "normgraph.analyze), or analyze the submodule you optimize. If the annotations come "
                         "from another model: re-run normgraph.analyze(model)")
    if missing:
        raise ValueError(f"parameters {missing[:5]} are in the norm graph but not in the model; the "
                         "annotations belong to another model: re-run normgraph.analyze(model)")
    for name, atom in ng.atoms.items():
        if tuple(named[name].shape) != tuple(atom.shape):
            raise ValueError(f"parameter {name!r} has shape {tuple(named[name].shape)} but its atom says "
                             f"{tuple(atom.shape)}; re-run normgraph.analyze(model)")
    uncovered = [n for n, p in named.items() if p.requires_grad and p.numel() and n not in ng.atoms]
    if uncovered:
        warnings.warn(f"normgraph: trainable parameters without an atom are NOT optimized: {uncovered[:5]}"
                      f"{' ...' if len(uncovered) > 5 else ''}; re-run analyze or optimize them separately",
                      RuntimeWarning, stacklevel=3)
    return [(n, named[n]) for n in ng.atoms if named[n].requires_grad]


def compile(model: torch.nn.Module, example_inputs: Any = None, example_kwargs: dict[str, Any] | None = None, *,  # noqa: A001
            lr: float = 0.1, momentum: float = 0.95, nesterov: bool = True, weight_decay: float = 0.0,
            orthogonalizer: str = "newton-schulz", ns_steps: int = 5, ns_coefficients: str | Sequence = "quintic",
            annotations: NormGraph | str | os.PathLike | None = None, masses: dict[str, float] | None = None,
            compute_dtype: torch.dtype | None = None, ns_method: str = "auto", compile_mode: str = "default",
            backend: str | None = "inductor", sensitivity: str = "scale",
            **analyze_kwargs: Any) -> NormGraphOptimizer:
    """Analyze `model` (or take `annotations`: a NormGraph or a JSON path, no tracing then)
    and build the optimizer around its generated duality map.

    `compile_mode="eager"` (or `backend=None`) skips torch.compile; if compiling fails the
    map warns and runs eagerly. `ns_method` ("auto", "direct", "gram") picks how Newton–Schulz
    is evaluated per matrix shape (see `normgraph.dual.use_gram`). Unknown keyword arguments
    go to `normgraph.analyze` (e.g. ``conv_mode="flatten"``), and so does `sensitivity`
    ("scale", the default, or "modula": see `normgraph.analyze`).
    """
    if annotations is None:
        from .analyze import analyze
        norm_graph = analyze(model, example_inputs, example_kwargs, masses=masses, sensitivity=sensitivity,
                             **analyze_kwargs)
    else:
        if (masses is not None or analyze_kwargs or example_inputs is not None or example_kwargs is not None
                or sensitivity != "scale"):
            warnings.warn("normgraph.compile: annotations given, so example inputs, masses and analyze "
                          "options are ignored (nothing is traced)", UserWarning, stacklevel=2)
        from .annotations import check_against, load
        norm_graph = annotations if isinstance(annotations, NormGraph) else load(annotations)
        check_against(norm_graph, model)  # lists every mismatch with the model at once
    return NormGraphOptimizer(model, norm_graph, lr=lr, momentum=momentum, nesterov=nesterov,
                              weight_decay=weight_decay, orthogonalizer=orthogonalizer, ns_steps=ns_steps,
                              ns_coefficients=ns_coefficients, compute_dtype=compute_dtype,
                              ns_method=ns_method, compile_mode=compile_mode, backend=backend)
