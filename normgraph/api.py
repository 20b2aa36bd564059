"""The public façade: entry points that run more than one pass.

Each pass lives in its own subpackage and knows nothing of the ones above it; only this
module wires them together (analysis → optim for `compile`, analysis → io for
`export_onnx`).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from .analysis.analyze import DEFAULT_SENSITIVITY, analyze
from .codegen.options import MapOptions
from .codegen.orthogonalizers import DEFAULT_SCHEDULE
from .core.graph import NormGraph
from .io.annotations import check_against, load as load_json
from .io.onnx import read_onnx_annotations, write_onnx
from .core.wrappers import WRAPPER_PREFIX, unwrap_data_parallel
from .optim.optimizer import NormGraphOptimizer, refuse_meta


def compile(model: torch.nn.Module, example_inputs: Any = None, example_kwargs: dict[str, Any] | None = None, *,  # noqa: A001
            lr: float = 0.25, momentum: float = 0.9, nesterov: bool = True, weight_decay: float | str = "auto",
            row_confidence: bool | str = "auto",
            orthogonalizer: str = "newton-schulz", ns_steps: int = 5, ns_coefficients: str | Sequence = DEFAULT_SCHEDULE,
            annotations: NormGraph | str | os.PathLike | None = None, masses: dict[str, float] | None = None,
            compute_dtype: torch.dtype | None = None, ns_method: str = "auto", compile_mode: str = "default",
            backend: str | None = "inductor", sensitivity: str = DEFAULT_SENSITIVITY, shard_map: bool | None = None,
            max_batch_bytes: int | str | None = "auto", reuse_grads: bool = True,
            **analyze_kwargs: Any) -> NormGraphOptimizer:
    """Analyze `model` (or take `annotations`: a NormGraph or a JSON path, no tracing then)
    and build the optimizer around its generated duality map.

    The map options (`orthogonalizer`: any registered name, see
    `normgraph.register_orthogonalizer`; `ns_steps`, `ns_coefficients`, `compute_dtype`,
    `ns_method`, `compile_mode`, `backend`, `max_batch_bytes`) form one `MapOptions`, kept in the optimizer's
    state dict. `compile_mode="eager"` (or `backend=None`) skips torch.compile; if compiling
    fails the map warns and runs eagerly. Unknown keyword arguments go to
    `normgraph.analyze` (e.g. ``conv_mode="flatten"``), and so does `sensitivity`.

    `weight_decay="auto"` (default) gives each parameter the decoupled decay its atom carries
    (`Atom.decay`: `BODY_DECAY` = 0.05 for the matrices inside residual branches, plain or
    explicitly weighted, and for a matrix that reads the unnormalised stream; 0 for everything
    else, and for every parameter of a network without residuals); a number gives every parameter that decay
    (0.0 turns it off). Either way one parameter's can be changed later with
    ``opt.group(name)["weight_decay"] = ...``.

    `row_confidence` scales each row of an embedding's update by that row's signal ratio over
    the largest (`optim.functional.row_confidences`, docs/concepts.md §7). "auto" (default):
    for the tables not tied to another use (a tied LM head keeps the plain map); True: every
    row-normalised atom (tables, and `channel_conv` filters); False: none (every row of an
    embedding moves by the full budget).

    `reuse_grads=True` (default) keeps the step's memory at the momentum buffers by writing the
    look-ahead and the update into each `.grad` (`NormGraphOptimizer`); False leaves the
    gradients untouched.

    A `DistributedDataParallel` model is analysed through its `.module` (names, masses and
    annotations work with or without the "module." prefix), and by default (`shard_map=None`)
    its ranks split the orthogonalizations (`normgraph.optim.sharded`, docs/distributed.md).
    """
    options = MapOptions(orthogonalizer=orthogonalizer, ns_steps=ns_steps, ns_coefficients=ns_coefficients,
                         compute_dtype=compute_dtype, ns_method=ns_method, compile_mode=compile_mode,
                         backend=backend, max_batch_bytes=max_batch_bytes)  # validated before anything is traced
    inner = unwrap_data_parallel(model)
    refuse_meta(dict(inner.named_parameters()))  # before any tracing: a meta model has no weights to step
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    group = model.process_group if ddp else None
    if shard_map is None:
        shard_map = ddp and torch.distributed.get_world_size(group) > 1
    if annotations is None:  # analyze reads a DDP model through .module, prefixed names included
        norm_graph = analyze(model, example_inputs, example_kwargs, masses=masses, sensitivity=sensitivity,
                             **analyze_kwargs)
    else:
        if (masses is not None or analyze_kwargs or example_inputs is not None or example_kwargs is not None
                or sensitivity != DEFAULT_SENSITIVITY):
            warnings.warn("normgraph.compile: annotations given, so example inputs, masses and analyze "
                          "options are ignored (nothing is traced)", UserWarning, stacklevel=2)
        norm_graph = annotations if isinstance(annotations, NormGraph) else load(annotations)
        if inner is not model:
            norm_graph = _without_prefix(norm_graph, WRAPPER_PREFIX)
        check_against(norm_graph, inner)  # lists every mismatch with the model at once
    return NormGraphOptimizer(inner, norm_graph, lr=lr, momentum=momentum, nesterov=nesterov,
                              weight_decay=weight_decay, row_confidence=row_confidence, map_options=options,
                              shard_map=shard_map, reuse_grads=reuse_grads,
                              process_group=group)


def load(path: str | os.PathLike) -> NormGraph:
    """Read saved annotations: a JSON file (`NormGraph.save`) or, for a path ending in .onnx,
    an annotated ONNX model (`export_onnx`, read by `read_onnx_annotations`). Either way they
    are validated and the budgets recomputed from the masses."""
    if Path(path).suffix.lower() == ".onnx":
        return read_onnx_annotations(path)
    return load_json(path)


def _without_prefix(ng: NormGraph, prefix: str) -> NormGraph:
    """Annotations saved from a wrapped model's names ("module.h.0...") for its inner module."""
    if not ng.atoms or not all(n.startswith(prefix) for n in ng.atoms):
        return ng
    atoms = {}
    for name, atom in ng.atoms.items():
        atoms[name[len(prefix):]] = dataclasses.replace(atom, name=name[len(prefix):])
    graph = nx.relabel_nodes(ng.graph, {n: n[len(prefix):] for n in ng.graph if n in ng.atoms}, copy=True)
    return NormGraph(atoms, graph, ng.diagnostics)


def export_onnx(model: Any, example_inputs: Sequence[Any] | Any, path: str | Path, *,
                example_kwargs: dict[str, Any] | None = None, norm_graph: NormGraph | None = None,
                optimize: bool = False, onnx_kwargs: dict[str, Any] | None = None,
                **analyze_kwargs: Any) -> Path:
    """Export `model` with ``torch.onnx.export(..., dynamo=True)`` and write the annotations into it.

    `norm_graph` defaults to ``normgraph.analyze(model, example_inputs, example_kwargs,
    **analyze_kwargs)``. `optimize` is off by default because the ONNX optimizer folds and
    renames parameters (fused BatchNorm, transposed/deduplicated weights), which leaves
    atoms with no initializer to sit on; they are then kept in the model-level metadata.
    """
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if norm_graph is None:
        norm_graph = analyze(model, tuple(example_inputs), example_kwargs, **analyze_kwargs)
    return write_onnx(model, tuple(example_inputs), path, norm_graph, example_kwargs=example_kwargs,
                      optimize=optimize, onnx_kwargs=onnx_kwargs)
