"""The optimizer around the generated duality map.

One step: EMA momentum (optionally Nesterov) → the generated duality map (every atom's
update has norm `budget` in its own norm) → the rows of untied embedding tables scaled by
their confidence (`row_confidence`, `functional.row_confidences`) → W ← W·(1 − lr·wd) −
lr·update, where wd is each atom's own `decay` (`weight_decay="auto"`, the default: the
analysis gives the matrices inside residual branches `BODY_DECAY` and every other atom 0) or
one number for every atom.

Parameter groups: one group per parameter, in atom order, each carrying the parameter's
`name`, so the modular-norm budget (baked into the map) and the step size (the group's
`lr`, changed freely at run time by you or a torch LR scheduler) stay separate knobs.
Set one parameter's lr with ``opt.group("h.0.mlp.c_fc.weight")["lr"] = 0.05``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .. import codegen
from ..codegen.options import MapOptions, options_from
from ..core.graph import Atom, NormGraph
from ..core.wrappers import WRAPPER_PREFIX, unwrap_data_parallel
from . import functional as F
from .fsdp import RowShardedMap, mesh_group
from .sharded import ShardedMap


class NormGraphOptimizer(torch.optim.Optimizer):
    """Steepest descent under the modular norm, with momentum and decoupled weight decay.

    Attributes: `norm_graph` (the analysis), `dualize` (the compiled duality map for all
    trainable atoms, gradients in `param_groups` order), `source` (its Python source),
    `map_options` (the `MapOptions` it was generated with; kept in every param group as a
    dict, so it is in `state_dict`), `shard_map` (whether the orthogonalizations are split
    over the ranks of `process_group`, see `optim.sharded`), `last_step_skipped` (True when the last step saw a
    non-finite gradient and changed nothing), `skipped_steps` (how many such steps so far),
    `reuse_grads` (see below).

    `reuse_grads=True` (default): a step needs no memory beyond the momentum buffers (and the
    map's batches, capped by `max_batch_bytes`): the Nesterov look-ahead and the update are
    written into each parameter's `.grad`, so after `step()` a `.grad` holds the update that
    was applied, not the gradient. Read or clip gradients before `step()` (as usual);
    `reuse_grads=False` leaves them as backward left them and allocates a copy of every
    direction and every update during the step.

    `row_confidence` (a bool param-group key, True only on the row-normalised atoms the
    choice takes): the rows of a row-normalised atom (an embedding table) are scaled by
    their signal ratio over the largest one's, so a row whose gradient is mostly noise moves
    less than one whose gradient is consistent; the update's norm (its largest row) stays
    the budget. "auto" (default) turns it on for the tables not tied to another use
    (`norm_graph.diagnostics.tied`: a tied LM head), True for every row-normalised atom
    (`channel_conv` filters too), False for none. State per such parameter: `row_moment`
    (one float per row, at least fp32) and `row_step`. Without momentum there is no ratio
    and no scaling.

    Parameters whose `grad` is None in a step (frozen, unused) are left exactly as they
    are, weight decay included; the map for that subset of atoms is generated once and
    cached. Budgets, shapes, dtypes, devices and map options are baked into the generated
    code, so changing any of them (e.g. ``opt.norm_graph.atoms[n].budget = ...``)
    regenerates it on the next step; changing lr, momentum or weight decay does not.
    """

    def __init__(self, params: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]], norm_graph: NormGraph, *,
                 lr: float = 0.25, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float | str = "auto", row_confidence: bool | str = "auto",
                 map_options: MapOptions | None = None, shard_map: bool = False,
                 process_group: Any = None, reuse_grads: bool = True, **options: Any) -> None:
        auto = isinstance(weight_decay, str)
        if auto and weight_decay != "auto":
            raise ValueError(f"weight_decay={weight_decay!r}: expected 'auto' (each atom's own `decay`, "
                             "from the analysis) or a number for every parameter")
        if not (math.isfinite(lr) and lr >= 0 and 0 <= momentum < 1
                and (auto or (math.isfinite(weight_decay) and weight_decay >= 0))):
            raise ValueError(f"need a finite lr >= 0, 0 <= momentum < 1, a finite weight_decay >= 0 or 'auto'; "
                             f"got lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        if row_confidence not in (True, False, "auto"):
            raise ValueError(f"row_confidence={row_confidence!r}: expected 'auto' (the tables not tied to "
                             "another use), True (every row-normalised table) or False (none)")
        self._auto_decay = auto  # `add_param_group` (also run by Optimizer.__init__) reads it
        map_opts = options_from(map_options, options)  # validates every option now, not at the first step
        if isinstance(params, torch.nn.Module):
            params = unwrap_data_parallel(params)  # names as the analysis sees them (no "module.")
        named = dict(params.named_parameters() if isinstance(params, torch.nn.Module) else params)
        refuse_meta(named)
        self.norm_graph = norm_graph
        groups = [{"params": [p], "name": name, "row_confidence": _rows_scaled(name, norm_graph, row_confidence)}
                  for name, p in _trainable(named, norm_graph)]
        if not groups:
            raise ValueError("no trainable parameter of the model has an atom in the norm graph; "
                             "re-run normgraph.analyze(model) on this model")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0 if auto else weight_decay,
                        row_confidence=False, map_options=map_opts.to_dict())
        super().__init__(groups, defaults)
        self.last_step_skipped = False
        self.skipped_steps = 0
        self.reuse_grads = bool(reuse_grads)
        self.shard_map = bool(shard_map)
        self.process_group = process_group
        tensors = [g["params"][0] for g in self.param_groups]
        #: FSDP2: the map runs on local row shards (`optim.fsdp`), over the parameters' mesh.
        self.row_sharded = _any_dtensor(tensors)
        if self.row_sharded:
            self.process_group = mesh_group(tensors)
            self.shard_map = True
        if self.shard_map and not torch.distributed.is_initialized():
            raise ValueError("shard_map=True needs an initialized torch.distributed process group "
                             "(torch.distributed.init_process_group)")
        self._maps: dict[str, Any] = {}
        self._fast: dict[tuple, Any] = {}
        self._map_for(list(range(len(self.param_groups))), [g["params"][0] for g in self.param_groups])

    # -- bookkeeping ---------------------------------------------------------------------

    @property
    def map_options(self) -> MapOptions:
        """The map's options, read from the param groups (where `load_state_dict` puts them)."""
        raw = self.param_groups[0]["map_options"]
        if any(g["map_options"] != raw for g in self.param_groups[1:]):
            odd = next(g["name"] for g in self.param_groups if g["map_options"] != raw)
            raise ValueError(f"param group {odd!r} has other map_options than the rest: one duality map "
                             "serves all parameters, so set them on every group (or rebuild the optimizer)")
        cached = self.__dict__.get("_parsed_options")
        if cached is None or cached[0] != raw:  # parse and validate once per change, not every step
            cached = (dict(raw), MapOptions.from_dict(raw))
            self._parsed_options = cached
        return cached[1]

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
        if self._auto_decay and "weight_decay" not in param_group:
            param_group = {**param_group, "weight_decay": float(atom.decay)}
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
        saved = [dict(g) for g in saved]
        for g in saved:  # validate the saved map options before anything changes
            if "map_options" in g:
                MapOptions.from_dict(g["map_options"])
            else:  # saved before map options were kept in the state dict: keep ours
                g["map_options"] = self.map_options.to_dict()
            g.setdefault("row_confidence", False)  # saved before row confidence: the step it was taking
        state_dict = {**state_dict, "param_groups": saved}
        if names != mine:  # same parameters, another order: reorder the saved groups to ours
            by_name = {g["name"]: g for g in saved}
            state_dict = {**state_dict, "param_groups": [by_name[n] for n in mine]}
        super().load_state_dict(state_dict)

    def atom(self, index: int) -> Atom:
        return self.norm_graph.atoms[self.param_groups[index]["name"]]

    def group(self, name: str) -> dict[str, Any]:
        """The param group (lr, momentum, nesterov, weight_decay) of the parameter `name`."""
        for candidate in (name, name.removeprefix(WRAPPER_PREFIX)):  # DDP's names work too
            for g in self.param_groups:
                if g["name"] == candidate:
                    return g
        raise KeyError(f"no parameter named {name!r} in this optimizer")

    @property
    def dualize(self) -> Any:
        """The duality map over all trainable atoms, for the parameters' current dtypes/devices
        (a `codegen.DualityMap`, or with `shard_map` a `ShardedMap` whose `.source` is this
        rank's share)."""
        return self._map_for(list(range(len(self.param_groups))), [g["params"][0] for g in self.param_groups])

    @property
    def source(self) -> str:
        """Python source of the duality map over all trainable atoms (read it like fx's `.code`)."""
        return self.dualize.source

    def _map_for(self, indices: list[int], tensors: list[torch.Tensor]) -> Any:
        """The generated map for these atoms, gradient dtypes/devices and map options; generated
        on a miss. The fast key holds everything the full key does except the atoms' contents
        beyond (identity, budget, shape), which change only through the norm graph."""
        atoms = [self.atom(i) for i in indices]
        specs = [codegen.spec_of(_local(t)) for t in tensors]
        options = self.map_options
        fast = (tuple(indices), tuple(specs), options,
                tuple((id(a), a.budget, a.shape, a.dual) for a in atoms))
        hit = self._fast.get(fast)
        if hit is not None:
            return hit
        key = codegen.cache_key(atoms, specs, options)
        if key not in self._maps:
            if self.row_sharded:
                self._maps[key] = RowShardedMap(atoms, specs, options, self.process_group)
            elif self.shard_map:
                self._maps[key] = ShardedMap(atoms, specs, options, self.process_group)
            else:
                _, self._maps[key] = codegen.generate(atoms, options, specs=specs)
        self._fast[fast] = self._maps[key]
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
        groups = [self.param_groups[i] for i in live]
        bad_lr = [g["name"] for g in groups if not math.isfinite(g["lr"])]
        if bad_lr:  # a scheduler or a hand edit set it after construction
            raise ValueError(f"normgraph: non-finite lr in the param group(s) of {', '.join(bad_lr[:3])}: "
                             f"{self.group(bad_lr[0])['lr']}; nothing was changed")
        params = [g["params"][0] for g in groups]
        grads = [p.grad for p in params]
        sparse = [g["name"] for g, gr in zip(groups, grads) if gr.is_sparse]
        if sparse:
            raise RuntimeError(f"normgraph: sparse gradients are not supported ({', '.join(sparse[:3])}): "
                               "build the layer with sparse=False (nn.Embedding(..., sparse=False))")
        dualize = self._map_for(live, grads)
        buffers = self._buffers(groups, params, grads)
        if self.row_sharded:  # FSDP2: everything below runs on this rank's row shards
            params, grads = [_local(p) for p in params], [_local(g) for g in grads]
            buffers = [_local(b) if b is not None else None for b in buffers]
        if not self._agreed_finite(grads):
            self._skip([g["name"] for g, gr in zip(groups, grads) if not torch.isfinite(gr).all()])
            return loss
        moments, steps = self._row_moments(live, groups, grads)
        if not any(m is not None for m in moments):
            moments = None  # no table scales its rows this step: the plain step
        F.normgraph_step(params, grads, buffers, dualize,
                         lrs=[g["lr"] for g in groups], momenta=[g["momentum"] for g in groups],
                         nesterovs=[bool(g["nesterov"]) for g in groups],
                         weight_decays=[g["weight_decay"] for g in groups],
                         row_moments=moments, row_steps=steps,
                         global_max=self._global_max if self.row_sharded else None,
                         reuse_grads=self.reuse_grads)
        return loss

    def _row_moments(self, live: list[int], groups: list[dict[str, Any]],
                     grads: list[torch.Tensor]) -> tuple[list[torch.Tensor | None], list[int]]:
        """Row moments (created as zeros) and this step's count for the row-normalised atoms
        with `row_confidence` and momentum; None for the rest. Runs only on steps taken."""
        moments: list[torch.Tensor | None] = []
        steps: list[int] = []
        for i, g, grad in zip(live, groups, grads):
            if not (g.get("row_confidence") and g["momentum"] and self.atom(i).dual == "row_normalize"):
                moments.append(None)
                steps.append(0)
                continue
            param = g["params"][0]
            state = self.state[param]
            if "row_moment" not in state:
                state["row_moment"] = _row_vector(param, grad)
                state["row_step"] = 0
            state["row_step"] += 1
            moments.append(_local(state["row_moment"]))
            steps.append(state["row_step"])
        return moments, steps

    def _global_max(self, maxima: torch.Tensor) -> torch.Tensor:
        """FSDP2: each rank holds some rows; the largest ratio is over all of them. `maxima` is
        the fresh stack `row_confidences` built, so it is reduced in place."""
        torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX, group=self.process_group)
        return maxima

    def _agreed_finite(self, grads: list[torch.Tensor]) -> bool:
        """All gradients finite, on every rank (each sees only its shards under FSDP2, and all
        ranks must skip a step together)."""
        ok = F.all_finite(grads)
        if self.row_sharded:
            flag = torch.tensor([0.0 if ok else 1.0], device=grads[0].device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.process_group)
            ok = flag.item() == 0
        return ok

    def _buffers(self, groups: list[dict[str, Any]], params: list[torch.Tensor],
                 grads: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Each parameter's momentum buffer (created as zeros on first use), None without momentum."""
        out: list[torch.Tensor | None] = []
        for g, p, grad in zip(groups, params, grads):
            if not g["momentum"]:
                out.append(None)
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad)
            out.append(state["momentum_buffer"])
        return out

    def _skip(self, bad: list[str]) -> None:
        self.last_step_skipped = True
        self.skipped_steps += 1
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        shown = shown or "another rank's shards"  # FSDP2: every rank skips when any rank saw one
        warnings.warn(f"normgraph: non-finite gradient in {shown}; step skipped (no weight or momentum "
                      "changed). Check the loss scale / learning rate.", RuntimeWarning, stacklevel=3)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("last_step_skipped", False)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("reuse_grads", True)


def refuse_meta(named: dict[str, torch.Tensor]) -> None:
    """Meta tensors have shapes but no data: analysis works on them, a step cannot."""
    meta = [n for n, p in named.items() if p.requires_grad and p.is_meta]
    if meta:
        raise ValueError(f"parameters {', '.join(meta[:3])}{' …' if len(meta) > 3 else ''} are on the meta "
                         "device (no data): build the optimizer after model.to_empty(device=...) and "
                         "loading or initialising the weights (normgraph.analyze works on the meta model: "
                         "save its annotations and pass them as compile(..., annotations=...))")


def _any_dtensor(tensors: list[torch.Tensor]) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(t, DTensor) for t in tensors)


def _rows_scaled(name: str, ng: NormGraph, choice: bool | str) -> bool:
    """The `row_confidence` group key: on for row-normalised atoms that the choice takes
    ("auto": the embedding tables not tied to another use; True: every row-normalised atom),
    off for every other atom."""
    atom = ng.atoms[name]
    if atom.dual != "row_normalize":
        return False
    if choice == "auto":
        return atom.kind == "embedding" and name not in ng.diagnostics.tied
    return bool(choice)


def _row_vector(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Zeros, one per row of `param` (at least fp32: bf16 gradients get fp32 moments). For an
    FSDP2 parameter a DTensor sharded as its rows are, so distributed checkpoints save it
    like the momentum buffer; `grad` is the local gradient (this rank's rows)."""
    wide = torch.promote_types(grad.dtype, torch.float32)
    local = torch.zeros(grad.shape[0], dtype=wide, device=grad.device)
    if not _any_dtensor([param]):
        return local
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=torch.Size([param.shape[0]]), stride=(1,))


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: in-place updates reach the DTensor), else `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


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
