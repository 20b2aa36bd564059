"""Annotated ONNX: write a `NormGraph` into an exported model, and read it back.

ONNX layout (see docs/annotations.md): every annotated parameter's fields sit in the
`metadata_props` of its initializer (``TensorProto.metadata_props``, IR version ≥ 10) under
``normgraph.<field>``; model-level `metadata_props` hold the schema, the totals, the
diagnostics and the op graph. Netron does not display initializer metadata, so a one-line
summary also goes on each node that consumes the parameter (Netron shows node metadata).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


from ..core.graph import Atom, NormGraph
from . import annotations

ONNX_PREFIX = "normgraph."
MIN_IR_VERSION = 10  # first IR version with TensorProto.metadata_props
#: Atom fields stored as raw strings in ONNX metadata; the others are JSON-encoded.
_STRING_FIELDS = frozenset(f.name for f in dataclasses.fields(Atom) if f.type == "str")


# ---------------------------------------------------------------- ONNX

def write_onnx(model: Any, example_inputs: tuple[Any, ...], path: str | Path, norm_graph: NormGraph, *,
               example_kwargs: dict[str, Any] | None = None, optimize: bool = False,
               onnx_kwargs: dict[str, Any] | None = None) -> Path:
    """Export `model` with ``torch.onnx.export(..., dynamo=True)`` and write `norm_graph`'s
    annotations into it (`normgraph.export_onnx` analyses the model first when needed)."""
    import torch

    program = torch.onnx.export(model, tuple(example_inputs), kwargs=example_kwargs or None,
                                dynamo=True, optimize=optimize, verbose=False, **(onnx_kwargs or {}))
    annotate_ir_model(program.model, norm_graph, model, program.exported_program)
    path = Path(path)
    program.save(path)
    return path


def _torch_names(model: Any, exported_program: Any) -> tuple[dict[str, str], dict[str, str]]:
    """(every parameter name → the canonical `named_parameters()` name, export placeholder → name)."""
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[name] = canonical.setdefault(id(p), name)
    placeholders: dict[str, str] = {}
    if exported_program is not None:
        placeholders = dict(exported_program.graph_signature.inputs_to_parameters)
    return aliases, placeholders


def annotate_ir_model(ir_model: Any, ng: NormGraph, model: Any, exported_program: Any = None) -> None:
    """Write `ng` into an onnx_ir model produced by torch's exporter (in place).

    Initializers are matched to parameters by name, then through the exporter's own record
    of the placeholder it came from (``pkg.torch.onnx.original_node_name`` →
    ``graph_signature.inputs_to_parameters``), then through tied-parameter aliases.
    """
    aliases, placeholders = _torch_names(model, exported_program)
    placed: set[str] = set()
    for init_name, value in ir_model.graph.initializers.items():
        torch_name = aliases.get(init_name)
        if torch_name is None:
            source = placeholders.get(value.metadata_props.get("pkg.torch.onnx.original_node_name", ""))
            torch_name = aliases.get(source or "", source)
        atom = ng.atoms.get(torch_name or "") or ng.atoms.get(init_name)
        if atom is None or value.const_value is None:
            continue
        value.const_value.metadata_props.update(atom_metadata(atom))
        placed.add(atom.name)
        summary = (f"{atom.kind} {atom.norm}, mass {atom.mass:.4g}, budget {atom.budget:.4g}, "
                   f"dual {atom.dual}")
        for node, _ in value.uses():
            node.metadata_props[f"{ONNX_PREFIX}{atom.name}"] = summary
    ir_model.ir_version = max(ir_model.ir_version or 0, MIN_IR_VERSION)
    ir_model.metadata_props.update(model_metadata(ng, placed))


def atom_metadata(atom: Atom) -> dict[str, str]:
    """One ``normgraph.<field>`` entry per Atom field: strings raw (readable), the rest JSON."""
    return {ONNX_PREFIX + k: (v if k in _STRING_FIELDS else json.dumps(v, ensure_ascii=False))
            for k, v in annotations.atom_to_dict(atom).items()}


def model_metadata(ng: NormGraph, placed: set[str]) -> dict[str, str]:
    doc = annotations.to_dict(ng)
    meta = {
        ONNX_PREFIX + "schema": doc["schema"],
        ONNX_PREFIX + "total_mass": json.dumps(doc["totals"]["total_mass"]),
        ONNX_PREFIX + "atoms": json.dumps(doc["totals"]["atoms"]),
        ONNX_PREFIX + "atom_order": json.dumps(list(ng.atoms), ensure_ascii=False),
        ONNX_PREFIX + "diagnostics": json.dumps(doc["diagnostics"], ensure_ascii=False),
        ONNX_PREFIX + "graph": json.dumps(doc["graph"], ensure_ascii=False),
    }
    for item in doc["atoms"]:  # parameters the ONNX graph has no initializer for
        if item["name"] not in placed:
            meta[f"{ONNX_PREFIX}atom:{item['name']}"] = json.dumps(item, ensure_ascii=False)
    return meta


def read_onnx_annotations(path: str | Path) -> NormGraph:
    """Read the annotations `export_onnx` wrote back into a `NormGraph` (validated like `load`)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    where = f"{path}: "
    if ONNX_PREFIX + "schema" not in meta:
        raise annotations.AnnotationError(f"{where}no normgraph annotations (model metadata_props "
                                          f"has no {ONNX_PREFIX}schema)")
    found: dict[str, dict[str, Any]] = {}
    for init in proto.graph.initializer:
        props = {p.key[len(ONNX_PREFIX):]: p.value for p in init.metadata_props
                 if p.key.startswith(ONNX_PREFIX)}
        if props:
            item = {k: (v if k in _STRING_FIELDS else _json(v, where, f"initializer {init.name!r}: {k}"))
                    for k, v in props.items()}
            found[item.get("name", init.name)] = item
    for key, value in meta.items():
        if key.startswith(ONNX_PREFIX + "atom:"):
            found[key[len(ONNX_PREFIX + "atom:"):]] = _json(value, where, key)
    order = _json(meta.get(ONNX_PREFIX + "atom_order", "null"), where, "atom_order") or list(found)
    missing = [n for n in order if n not in found]
    if missing:
        raise annotations.AnnotationError(f"{where}no annotations for {', '.join(missing)} "
                                          f"(listed in {ONNX_PREFIX}atom_order)")
    doc = {
        "schema": meta[ONNX_PREFIX + "schema"],
        "totals": {"total_mass": _json(meta.get(ONNX_PREFIX + "total_mass", "null"), where, "total_mass"),
                   "atoms": _json(meta.get(ONNX_PREFIX + "atoms", str(len(order))), where, "atoms")},
        "atoms": [found[n] for n in order],
        "diagnostics": _json(meta.get(ONNX_PREFIX + "diagnostics", "{}"), where, "diagnostics"),
        "graph": _json(meta.get(ONNX_PREFIX + "graph", "null"), where, "graph"),
    }
    if doc["totals"]["total_mass"] is None:
        del doc["totals"]["total_mass"]
    return annotations.from_dict(doc, where)


def _json(text: str, where: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise annotations.AnnotationError(f"{where}{what}: not valid JSON ({e})") from None
