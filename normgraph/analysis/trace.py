"""Front end: capture a torch.fx graph of any `nn.Module`, and say which node is which parameter.

Strategies, in order (the first that succeeds is recorded in the diagnostics):

1. with example inputs: `torch.export.export(model, args, kwargs, strict=False)`;
2. `torch.fx.symbolic_trace`-style tracing through every module except those whose module
   rule asks to stay opaque (e.g. `nn.MultiheadAttention`);
3. the same, with torch.nn's own layers kept as opaque leaf modules.

If all fail, `capture` returns no graph and the analysis falls back to module-level rules.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.fx.config  # noqa: F401 - `fx.config` below

from .rules import module_entry


@dataclass
class Captured:
    """A captured graph and the meaning of its boundary nodes."""

    graph: fx.Graph | None
    frontend: str
    params: dict[fx.Node, str] = field(default_factory=dict)   # node -> trainable parameter name
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # call_module target -> module
    outputs: list[fx.Node] = field(default_factory=list)       # user outputs (seed D = 1)
    constants: set[fx.Node] = field(default_factory=set)       # buffers and lifted constants
    values: dict[fx.Node, torch.Tensor] = field(default_factory=dict)  # their tensors, where known
    errors: dict[str, str] = field(default_factory=dict)       # strategy -> why it failed
    notes: list[str] = field(default_factory=list)


def trainable_names(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter) -> its `named_parameters()` name, trainable parameters only."""
    return {id(p): n for n, p in model.named_parameters() if p.requires_grad}


def _short(e: BaseException, limit: int = 400) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[:limit] + " …"


def _with_use_cache_off(model: torch.nn.Module, kwargs: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Causal LMs return a KV cache object that torch.export cannot trace; analysis needs none."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs:
        notes.append("added use_cache=False to the example kwargs (a KV cache is not needed for analysis)")
        return {**kwargs, "use_cache": False}
    return kwargs


def _export(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], names: dict[int, str]) -> Captured:
    # the analysis reads no node's stack trace: not recording them takes a fifth off the capture
    # of a deep model (a 48-layer Llama: 8.5-10.4 s against 11.8-14.1 s on a busy 2-core machine)
    previous = fx.config.do_not_emit_stack_traces
    fx.config.do_not_emit_stack_traces = True
    try:
        ep = torch.export.export(model, args, kwargs, strict=False)
    finally:
        fx.config.do_not_emit_stack_traces = previous
    graph = ep.graph_module.graph
    sig = ep.graph_signature
    cap = Captured(graph, "torch.export")
    by_name = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    for placeholder, fqn in sig.inputs_to_parameters.items():
        try:
            p = model.get_parameter(fqn)
        except AttributeError:
            continue
        if id(p) in names:
            cap.params[by_name[placeholder]] = names[id(p)]
    for placeholder in [*sig.inputs_to_buffers, *sig.inputs_to_lifted_tensor_constants]:
        cap.constants.add(by_name[placeholder])
    tensors = {**ep.state_dict, **ep.constants}
    for placeholder, fqn in [*sig.inputs_to_buffers.items(), *sig.inputs_to_lifted_tensor_constants.items()]:
        if isinstance(tensors.get(fqn), torch.Tensor):
            cap.values[by_name[placeholder]] = tensors[fqn]
    for name, node in by_name.items():
        if name in sig.inputs_to_parameters and node not in cap.params:
            cap.constants.add(node)  # frozen parameters act as constants
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    values = out_node.args[0] if isinstance(out_node.args[0], (list, tuple)) else [out_node.args[0]]
    for spec, value in zip(sig.output_specs, values):
        if spec.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT and isinstance(value, fx.Node):
            cap.outputs.append(value)
    return cap


def _export_any_mode(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], names: dict[int, str],
                     notes: list[str]) -> Captured:
    """Export in the model's own mode; if that fails in train mode (train-time randomness such as
    LayerDrop's data-dependent branch), retry in eval mode and restore the mode. The graph is
    the same but for dropout and layer skipping, which the analysis reads as identities."""
    try:
        return _export(model, args, kwargs, names)
    except Exception as first:  # noqa: BLE001 - reported if the retry fails too
        if not model.training:
            raise
        model.eval()
        try:
            cap = _export(model, args, kwargs, names)
        except Exception:  # noqa: BLE001
            raise first from None
        finally:
            model.train()
        notes.append(f"exported in eval mode: in train mode torch.export failed ({_short(first, 160)})")
        return cap


class _Tracer(fx.Tracer):
    """Traces through every module but those whose rule asks to stay opaque."""

    def __init__(self, keep_torch_leaves: bool) -> None:
        super().__init__()
        self.keep_torch_leaves = keep_torch_leaves

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        entry = module_entry(m)
        if entry is not None and entry.leaf:
            return True
        return self.keep_torch_leaves and super().is_leaf_module(m, qualname)


def _symbolic(model: torch.nn.Module, names: dict[int, str], keep_torch_leaves: bool) -> Captured:
    graph = _Tracer(keep_torch_leaves).trace(model)
    cap = Captured(graph, "torch.fx.symbolic_trace" + (" (torch.nn leaves)" if keep_torch_leaves else ""))
    cap.modules = dict(model.named_modules())
    for node in graph.nodes:
        if node.op == "get_attr":
            try:
                p = model.get_parameter(str(node.target))
            except AttributeError:
                p = None
            if p is not None and id(p) in names:
                cap.params[node] = names[id(p)]
            else:
                cap.constants.add(node)  # buffers, constants, frozen parameters
                value = _attribute(model, str(node.target))
                if isinstance(value, torch.Tensor):
                    cap.values[node] = value
        elif node.op == "output":
            out = node.args[0]
            stack = [out]
            while stack:
                v = stack.pop()
                if isinstance(v, fx.Node):
                    cap.outputs.append(v)
                elif isinstance(v, (list, tuple)):
                    stack.extend(v)
                elif isinstance(v, dict):
                    stack.extend(v.values())
    return cap


def _attribute(model: torch.nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _model_rejects(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> BaseException | None:
    """Run the model once on the example inputs: its own error, if it rejects them."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - we quote whatever the model raised
        return e
    return None


def capture(model: torch.nn.Module, example_inputs: tuple | None = None,
            example_kwargs: dict[str, Any] | None = None, frontend: str = "auto") -> Captured:
    """Capture a graph with the first strategy that works (see the module docstring).

    `frontend` forces one strategy: "export", "symbolic_trace" or "modules".
    Raises ValueError when the model itself rejects the example inputs.
    """
    names = trainable_names(model)
    errors: dict[str, str] = {}
    notes: list[str] = []
    has_inputs = example_inputs is not None or example_kwargs is not None
    args = tuple(example_inputs) if example_inputs is not None else ()
    kwargs = dict(example_kwargs or {})
    if has_inputs:
        kwargs = _with_use_cache_off(model, kwargs, notes)

    order = {"auto": ["export", "symbolic_trace", "symbolic_trace_leaves"] if has_inputs
             else ["symbolic_trace", "symbolic_trace_leaves"],
             "export": ["export"], "symbolic_trace": ["symbolic_trace", "symbolic_trace_leaves"],
             "modules": []}
    if frontend not in order:
        raise ValueError(f"frontend={frontend!r}: expected one of {sorted(order)}")
    if frontend == "export" and not has_inputs:
        raise ValueError("frontend='export' needs example_inputs (or example_kwargs)")

    for strategy in order[frontend]:
        try:
            if strategy == "export":
                cap = _export_any_mode(model, args, kwargs, names, notes)
            else:
                cap = _symbolic(model, names, keep_torch_leaves=strategy == "symbolic_trace_leaves")
        except Exception as e:  # noqa: BLE001 - every failure is reported, none is silent
            if strategy == "export":
                rejected = _model_rejects(model, args, kwargs)
                if rejected is not None:
                    raise ValueError(f"{type(model).__name__} rejects the example inputs: "
                                     f"{_short(rejected)}") from rejected
            errors[strategy] = _short(e)
            continue
        cap.errors, cap.notes = errors, notes
        return cap
    return Captured(None, "modules (no graph)", errors=errors, notes=notes)
