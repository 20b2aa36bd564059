"""The public façade: entry points that run more than one pass.

Each pass lives in its own subpackage and knows nothing of the ones above it; only this
module wires them together (analysis → optim for `compile`, analysis → io for
`export_onnx`).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .analysis.analyze import analyze
from .codegen.options import MapOptions
from .core.graph import NormGraph
from .io.annotations import check_against, load
from .io.onnx import write_onnx
from .optim.optimizer import NormGraphOptimizer


def compile(model: torch.nn.Module, example_inputs: Any = None, example_kwargs: dict[str, Any] | None = None, *,  # noqa: A001
            lr: float = 0.1, momentum: float = 0.95, nesterov: bool = True, weight_decay: float = 0.0,
            orthogonalizer: str = "newton-schulz", ns_steps: int = 5, ns_coefficients: str | Sequence = "quintic",
            annotations: NormGraph | str | os.PathLike | None = None, masses: dict[str, float] | None = None,
            compute_dtype: torch.dtype | None = None, ns_method: str = "auto", compile_mode: str = "default",
            backend: str | None = "inductor", sensitivity: str = "scale",
            **analyze_kwargs: Any) -> NormGraphOptimizer:
    """Analyze `model` (or take `annotations`: a NormGraph or a JSON path, no tracing then)
    and build the optimizer around its generated duality map.

    The map options (`orthogonalizer`: any registered name, see
    `normgraph.register_orthogonalizer`; `ns_steps`, `ns_coefficients`, `compute_dtype`,
    `ns_method`, `compile_mode`, `backend`) form one `MapOptions`, kept in the optimizer's
    state dict. `compile_mode="eager"` (or `backend=None`) skips torch.compile; if compiling
    fails the map warns and runs eagerly. Unknown keyword arguments go to
    `normgraph.analyze` (e.g. ``conv_mode="flatten"``), and so does `sensitivity`.
    """
    options = MapOptions(orthogonalizer=orthogonalizer, ns_steps=ns_steps, ns_coefficients=ns_coefficients,
                         compute_dtype=compute_dtype, ns_method=ns_method, compile_mode=compile_mode,
                         backend=backend)  # validated before anything is traced
    if annotations is None:
        norm_graph = analyze(model, example_inputs, example_kwargs, masses=masses, sensitivity=sensitivity,
                             **analyze_kwargs)
    else:
        if (masses is not None or analyze_kwargs or example_inputs is not None or example_kwargs is not None
                or sensitivity != "scale"):
            warnings.warn("normgraph.compile: annotations given, so example inputs, masses and analyze "
                          "options are ignored (nothing is traced)", UserWarning, stacklevel=2)
        norm_graph = annotations if isinstance(annotations, NormGraph) else load(annotations)
        check_against(norm_graph, model)  # lists every mismatch with the model at once
    return NormGraphOptimizer(model, norm_graph, lr=lr, momentum=momentum, nesterov=nesterov,
                              weight_decay=weight_decay, map_options=options)


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
