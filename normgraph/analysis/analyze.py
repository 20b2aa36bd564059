"""Norm inference: from a captured graph to atoms with norms, masses, sensitivities, budgets.

The pass is four plain functions over the captured graph:

1. `downstream`: reverse path-sum of bond sensitivities from the outputs, D(out) = 1 and
   D(v) = Σ over uses of v by an op of (that op's sensitivity to that input) × D(op output);
2. `classify`: each trainable parameter's uses (after pure data movement) and the atom rule
   of each consuming op;
3. masses: default masses per kind; in "hybrid" mode the residual body (`residual`) shares
   `BODY_MASS` (`_weigh_body`) and its budgets are read in quadrature
   (`_read_body_in_quadrature`) and depth-flat (`_flatten_body`); the matrices inside any residual branches are marked for
   `BODY_DECAY` (`_decay_body`); beside a body, tables read at fixed indices and the gains in
   front of a tied head take their own masses (`_weigh_position_tables`, `_weigh_tied_head_norm`);
   a conv reading the raw input is a `stem` (`_mark_stems`), and one whose output only a
   BatchNorm reads is a `channel_conv` (`_mark_channel_convs`);
   then the user's `masses` prefixes (`apply_masses`, modula's tare);
4. budgets: budget = mass / total_mass / D(output of the atom's op) × budget_scale, modula's
   target_norm at T=1 (budget_scale is 1 outside a residual body).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping

import networkx as nx
import torch
import torch.fx as fx

from ..core.graph import Atom, Diagnostics, NormGraph, budget_of
from ..core.kinds import is_orthogonalized, kind_of
from ..core.layout import matrix_options, part_options
from ..core.wrappers import WRAPPER_PREFIX, unwrap_data_parallel
from . import ops
from .rules import (ATOM_RULES, PARAM_FLOW,
                    AtomSpec, BondInput, Use, bond_sensitivity, module_entry)
from .patterns import attention_reads, output_parts, rotary_joins
from .residual import Residuals, residuals
from .scale import MATRIX_OPS, NORMALISATIONS, SCALE_PASSTHROUGH, SUMS, Scales, atom_gain, is_integer, scaled_bond
from .trace import Captured, capture
from .wrappers import analysable, on_meta, to_meta

SENSITIVITY_MODES = ("hybrid", "scale", "modula", "typical")
#: The default mode (docs/concepts.md says why, with the measurements that chose it).
DEFAULT_SENSITIVITY = "hybrid"
#: Total mass of the residual body in "hybrid" mode (docs/concepts.md: measured across depth).
BODY_MASS = 8.0
#: Mass of a table read at fixed indices (positions, a constant token type) beside a residual
#: body: a tenth of a bias's. Its rows are added to every sequence, so they must not outgrow the
#: token rows they sit beside (`_weigh_position_tables`; measured in docs/concepts.md §5).
POSITION_TABLE_MASS = 0.01
#: Mass of each gain and bias applied to the activation a tied head reads (the normalisation in
#: front of it) beside a residual body: three times a gain's. The tied table moves at its
#: embedding's budget, so the logits' scale and offset move mostly through these atoms
#: (`_weigh_tied_head_norm`; measured on BERT and GPT-2 in docs/concepts.md §5, rule 9).
TIED_HEAD_NORM_MASS = 0.3
#: Reference size of a residual body, in mass-weighted atoms (n_eff = (Σm)²/Σm²): the body
#: atoms' budgets are scaled by √(n_eff / n_ref). 28 is a 4-layer Llama's body (7 matrices
#: per block), the depth at which `BODY_MASS` was chosen, so 4-layer models keep their budgets
#: (`_read_body_in_quadrature`; measured across depth in docs/concepts.md §5).
BODY_REFERENCE_ATOMS = 28.0
#: Decoupled weight decay that `compile(weight_decay="auto")` gives the matrices inside residual
#: branches, plain or explicitly weighted (W ← W·(1 − lr·decay) − lr·update): with steps of
#: fixed norm their norms otherwise grow without bound; with it a matrix settles at
#: ≤ budget/decay in its own norm (docs/concepts.md §5, rule 6).
BODY_DECAY = 0.0
#: Decoupled weight decay of the matrices inside explicitly weighted residual branches
#: (modula's convex `(1 − 1/L)·x + f(x)/L`, the demo GPT's).
WEIGHTED_BRANCH_DECAY = 0.05
#: Decoupled weight decay of a matrix outside the body that reads the unnormalised residual
#: stream (a ResNet's classifier after pooling): its logits grow with the stream.
STREAM_READER_DECAY = 0.05
#: Input scale above which a matrix outside the body reads an unnormalised residual stream
#: (and decays too): a normalisation's output has scale 1 at initialisation, a stream after
#: one plain join √2.
STREAM_INPUT_SCALE = 1.2
#: How the body's budgets vary with depth: "flat" (default) or "measured" (`_flatten_body`).
BODY_PROFILES = ("flat", "measured")

FALLBACK_NOTE = "fallback: RMS norm of the whole tensor, dual = normalise to RMS 1"


def analyze(model: torch.nn.Module, example_inputs: Any = None,
            example_kwargs: Mapping[str, Any] | None = None,
            masses: Mapping[str, float] | None = None, *,
            kinds: Mapping[str, str] | None = None, frontend: str = "auto",
            conv_mode: str = "positional", split_packed: bool = True,
            sensitivity: str = DEFAULT_SENSITIVITY, body_mass: float | str | None = "auto",
            body_reference: float | str | None = "auto", body_decay: float | str = "auto",
            body_profile: str = "flat", stems: bool = True, channel_convs: bool = True) -> NormGraph:
    """Infer every trainable parameter's operator norm, mass, sensitivity and budget.

    Args:
        model: any `torch.nn.Module`.
        example_inputs: positional inputs (a tensor or a tuple); with them the graph comes
            from `torch.export` (more models trace that way than with `symbolic_trace`).
        example_kwargs: keyword inputs (e.g. `{"attention_mask": m}`).
        masses: module-name prefix (or exact parameter name) -> total mass of the atoms
            under it, split in proportion to their own masses; the longest key wins.
        kinds: parameter name -> kind, to override the rule's choice (e.g. a tied
            embedding treated as the output head: `{"wte.weight": "linear"}`).
        frontend: "auto", "export", "symbolic_trace" or "modules" (see `normgraph.analysis.trace`).
        conv_mode: "positional" (per kernel position, the paper's rule) or "flatten".
        split_packed: orthogonalize packed projections (QKV split after one matmul) per block.
        sensitivity: how sensitivities combine (docs/concepts.md §5). "hybrid" (default):
            activation scales propagated from well-normed atoms, normalisations undo the
            growth of a residual stream (see `normgraph.analysis.scale`); plain sums combine
            in quadrature, weighted sums and shared readers worst case. "scale": the same
            scales, worst case everywhere. "typical": quadrature everywhere. "modula":
            modula's algebra exactly (every activation unit-sized).
        body_mass: total mass of the atoms inside residual branches (`normgraph.analysis.residual`),
            split in proportion to their own masses, so the embeddings' and the head's shares
            do not shrink as layers are added (modula's `blocks_mass`). "auto": `BODY_MASS`
            in "hybrid" mode, off in the others; None: off (one unit per atom); a number: that
            total, in any mode but "modula". Networks whose residuals are explicitly weighted
            (modula's convex residuals) have no plain-sum joins and keep their masses.
            Beside a body, tables read at fixed indices take `POSITION_TABLE_MASS` and the
            gains and biases in front of a tied head `TIED_HEAD_NORM_MASS`.
            `masses=` is applied afterwards and wins.
        body_reference: read the body atoms' changes in quadrature: their budgets are scaled
            by √(n_eff / n_ref), n_eff = (Σm)²/Σm² over the body, so that per-atom steps
            shrink like 1/√depth instead of 1/depth (independent changes of a plain sum add
            like √n). "auto": n_ref = `BODY_REFERENCE_ATOMS` whenever the body is weighed;
            None: off; a number: that n_ref. With `body_mass` on, the matrices inside any
            residual branches (explicitly weighted ones too) are also marked for `BODY_DECAY`
            (`Atom.decay`, used by `compile(weight_decay="auto")`).
        body_decay: that decay. "auto": `BODY_DECAY` (0.05); a number >= 0 (0 marks nothing).
            Small datasets seen for many epochs want more (a 4-layer ViT on digits tied
            Muon+AdamW's test loss at 0.1), language models that see fresh data less
            (docs/concepts.md §5, rule 6).
        body_profile: "flat" (default): every residual branch's output counts the body's
            common downstream (the harmonic mean over its branches), so budgets do not vary
            with depth inside the body; "measured": each branch keeps the downstream read at
            initialisation, where the first branches of a stream that starts small count
            several times the last (docs/concepts.md §5, rule 7). Applies whenever the body is weighed.
        stems: in "hybrid" mode, a conv that reads the model's raw input (an image stem, a
            ViT's patch embedding: no trainable op between a float model input and it)
            becomes a `stem` atom: sign dual, mass `kind_of("stem").mass` (0.1), so it moves
            entrywise whatever its kernel size (docs/concepts.md §5, rule 8). False keeps it
            a `conv`; `kinds=` overrides it per parameter.
        channel_convs: in "hybrid" mode, a conv whose output only a BatchNorm reads becomes a
            `channel_conv` atom: each output channel's filter is moved by the same RMS
            (row-normalised dual), the conv's budget shared over its K kernel positions
            (budget_scale / K, as the per-position norm shares it), and no weight decay
            (docs/concepts.md §5, rule 10). False keeps it a `conv`; `kinds=` overrides it.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"normgraph.analyze expects a torch.nn.Module, got {type(model).__name__}")
    if sensitivity not in SENSITIVITY_MODES:
        raise ValueError(f"sensitivity={sensitivity!r}: expected one of {SENSITIVITY_MODES}")
    body_mass = _body_mass(body_mass, sensitivity)
    body_reference = _body_reference(body_reference)
    body_decay = _body_decay(body_decay)
    if body_profile not in BODY_PROFILES:
        raise ValueError(f"body_profile={body_profile!r}: expected one of {BODY_PROFILES}")
    if not isinstance(stems, bool):
        raise ValueError(f"stems={stems!r}: expected True (a conv reading the raw input is a stem) or False")
    if not isinstance(channel_convs, bool):
        raise ValueError(f"channel_convs={channel_convs!r}: expected True (a conv read only by a BatchNorm "
                         "is moved per output channel) or False")
    if conv_mode not in ("positional", "flatten"):
        raise ValueError(f"conv_mode={conv_mode!r}: expected 'positional' or 'flatten'")
    _refuse_unsupported({n: p for n, p in model.named_parameters() if p.requires_grad and p.numel() > 0})
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    if unwrap_data_parallel(model) is not model:  # DDP: names as the wrapped module has them
        masses = {k.removeprefix(WRAPPER_PREFIX): v for k, v in (masses or {}).items()}
        kinds = {k.removeprefix(WRAPPER_PREFIX): v for k, v in (kinds or {}).items()}
    model, example_inputs, example_kwargs, wrapped = analysable(model, example_inputs, example_kwargs)
    weightless = on_meta(model)
    if weightless:  # shapes and the graph are all the analysis reads: run the inputs on meta too
        example_inputs, example_kwargs = to_meta(example_inputs), to_meta(example_kwargs)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad and p.numel() > 0}
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameters "
                         "(all are frozen, empty, or it has none): nothing to optimize")

    cap = capture(model, example_inputs, dict(example_kwargs) if example_kwargs else None, frontend)
    diag = Diagnostics(frontend=cap.frontend, trace_errors=dict(cap.errors), notes=list(cap.notes))
    if wrapped:
        diag.notes.append(wrapped)
    if weightless and not wrapped:
        diag.notes.append("parameters on the meta device: analysed from their shapes and the graph "
                          "(compile needs the weights: model.to_empty(device=...), then load them)")
    if cap.graph is None:
        atoms = _module_atoms(model, trainable, conv_mode, diag)
        graph = nx.DiGraph()
        first = next(iter(cap.errors.values()), "no strategy was tried")
        warnings.warn(
            f"normgraph could not capture a graph of {type(model).__name__} ({first}); using "
            "module-level rules: atoms from the layers that own parameters, no sensitivities "
            "(every downstream = 1). For the full analysis pass example_inputs "
            "(and example_kwargs) the model accepts.", stacklevel=2)
    else:
        uses = classify(cap, trainable, conv_mode, split_packed)
        scales = None
        if sensitivity in ("scale", "typical", "hybrid"):
            biases = {n for n, specs in uses.items()
                      if (kinds or {}).get(n, specs[0][0].kind if specs else "") == "bias"}
            live = _live(cap)
            scales = Scales(cap.graph, live, cap.params, biases, cap.modules, rotary_joins(cap, live),
                            p=1.0 if sensitivity == "scale" else 2.0, values=cap.values,
                            hybrid=sensitivity == "hybrid")
        if scales is not None and scales.unknown:
            names = [n.name for n in scales.unknown]
            diag.notes.append(f"constant(s) with no values (meta device): {', '.join(names[:4])}"
                              f"{' …' if len(names) > 4 else ''} count scale 1 where they multiply an "
                              "activation (with their values, their largest entry)")
        D, assumed = downstream(cap, scales)
        diag.assumed_ops = assumed
        atoms = _graph_atoms(trainable, uses, D, kinds or {}, diag, scales)
        parts: dict[str, int] = {}
        if sensitivity == "hybrid":
            parts = _weigh_fused_projections(atoms, uses, cap, scales.live, kinds or {}, diag)
        if stems and sensitivity == "hybrid":
            _mark_stems(atoms, uses, scales, kinds or {}, diag)
        plain = _residuals(cap, scales, plain_only=True) if body_mass is not None and scales else None
        body = _weigh_body(_atoms_in(plain.body, atoms, uses), body_mass, diag) if plain is not None else []
        if body:
            _weigh_position_tables(atoms, uses, scales.live, diag)
            _weigh_tied_head_norm(atoms, uses, cap, scales, diag)
            _read_body_in_quadrature(body, body_reference, parts, diag)
            if body_profile == "flat":
                _flatten_body(body, uses, plain, D, diag)
        if channel_convs and sensitivity == "hybrid":  # after the body: its 1/K joins budget_scale
            _mark_channel_convs(atoms, uses, scales, kinds or {}, diag)
        if plain is not None:  # any residual, weighted ones too (modula's convex)
            every = _residuals(cap, scales, plain_only=False) if _has_weighted_join(cap, scales) else plain
            weighted = [a for a in _atoms_in(every.body, atoms, uses) if a not in body]
            _decay_body(body, weighted, atoms, uses, scales, body_decay, diag)
        graph = _to_networkx(cap, D, uses, scales)
    _check_kinds(kinds or {}, trainable)
    apply_masses(atoms, masses or {})
    _budgets(atoms)
    if cap.graph is not None:
        _warn_spread(atoms, cap, D, scales, diag)
    for atom in atoms.values():
        if atom.name in graph:
            graph.nodes[atom.name].update(_atom_attrs(atom))
        else:
            graph.add_node(atom.name, **_atom_attrs(atom))
    return NormGraph(atoms, graph, diag)


def _body_mass(value: float | str | None, sensitivity: str) -> float | None:
    if value == "auto":
        return BODY_MASS if sensitivity == "hybrid" else None
    if value is None:
        return None
    if isinstance(value, str) or not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"body_mass={value!r}: expected 'auto', None or a positive number")
    if sensitivity == "modula":
        raise ValueError("body_mass needs a scale-reading sensitivity mode (\"hybrid\", \"scale\", "
                         "\"typical\"); sensitivity=\"modula\" keeps modula's masses exactly")
    return float(value)


def _body_reference(value: float | str | None) -> float | None:
    if value == "auto":
        return BODY_REFERENCE_ATOMS
    if value is None:
        return None
    if isinstance(value, str) or not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"body_reference={value!r}: expected 'auto', None or a positive number "
                         "(the body size, in atoms, at which budgets are left as they are)")
    return float(value)


def _body_decay(value: float | str) -> float:
    if value == "auto":
        return BODY_DECAY
    if isinstance(value, str) or not (math.isfinite(float(value)) and float(value) >= 0):
        raise ValueError(f"body_decay={value!r}: expected 'auto' or a finite number >= 0 (the weight "
                         "decay compile(weight_decay='auto') gives the matrices inside residual branches)")
    return float(value)


def _read_body_in_quadrature(body: list[Atom], n_ref: float | None, parts: Mapping[str, int],
                             diag: Diagnostics) -> None:
    """Scale the body atoms' budgets by √(n_eff / n_ref), n_eff = (Σm)²/Σm².

    Why: a fixed body mass split over n atoms gives each a share ∝ 1/n, as if all n changes
    added up coherently at the output. The terms of a plain residual sum are independent, so
    they add like √n, and each atom's step may shrink only like 1/√n. Without this a 16-layer
    Llama trained best at 4× the lr of a 2-layer one; with it (and the body's decay) its best
    lr is the same at 2, 4, 8 and 16 layers, and deep models gain (docs/concepts.md §5)."""
    if n_ref is None:
        return
    s1 = sum(a.mass for a in body)
    s2 = sum(a.mass * a.mass / parts.get(a.name, 1) for a in body)  # a fused atom: k atoms of mass m/k
    if s1 <= 0 or s2 <= 0:
        return
    n_eff = s1 * s1 / s2
    factor = math.sqrt(n_eff / n_ref)
    for a in body:
        a.budget_scale = factor
    diag.notes.append(f"residual body read in quadrature: n_eff = {n_eff:.3g} atoms against "
                      f"body_reference {n_ref:g}, so its budgets × {factor:.3g}")


def _flatten_body(body: list[Atom], uses: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]],
                  plain: Residuals, D: dict[fx.Node, float], diag: Diagnostics) -> None:
    """Give every residual branch's output the body's common downstream: each body atom's
    budget is scaled by D(its branch's output) / D̄, D̄ the harmonic mean over the branches.

    Why: the downstream is read at initialisation, when the stream is the embedding's output
    (RMS ~0.02 in ViT and GPT-2) plus the branches so far, so the first branches make up most
    of it and count several times the last (a 16-layer ViT: 0.85 against 0.17). In training
    the embedding and the stream grow and that ratio does not last; with it the first
    blocks' matrices took 1/14 of the last ones' steps and a 16-layer ViT trained to 0.092
    against Muon+AdamW's 0.035, with a flat body 0.056 (8 seeds; docs/concepts.md §5, rule 7). The
    ratios inside a branch (q, k and v against the output projection) stay as measured, and
    the mean keeps the body's total step: Σ budgets over the branches is unchanged."""
    outputs = plain.branch
    own: dict[str, fx.Node] = {}
    for a in body:
        terms = [outputs[node] for _, node, _ in uses.get(a.name, ()) if node in outputs]
        if terms and D.get(terms[0], 0.0) > 0:
            own[a.name] = terms[0]
    terms = list(dict.fromkeys(own.values()))
    if len(terms) < 2:
        return
    mean = len(terms) / sum(1.0 / D[t] for t in terms)
    for a in body:
        if a.name in own:
            a.budget_scale *= D[own[a.name]] / mean
    ds = [D[t] for t in terms]
    diag.notes.append(f"residual body read depth-flat: its {len(terms)} branches' downstreams "
                      f"{min(ds):.3g} … {max(ds):.3g} counted as their harmonic mean {mean:.3g} "
                      "(body_profile=\"flat\")")


def _decay_body(body: list[Atom], weighted: list[Atom], atoms: dict[str, Atom],
                uses: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]], scales: Scales,
                decay: float, diag: Diagnostics) -> None:
    """Mark the matrices inside residual branches (`body`: of any residual, weighted or plain),
    and the matrices that read the residual stream itself, for weight decay `decay`.

    Why: fixed-norm steps let a matrix grow without bound (a 4-layer ViT's q/k reached 3.5×
    the norms Muon's did, and it trained worse). Outside the body only a matrix whose input
    is the unnormalised stream decays (a ResNet's classifier after pooling: its logits grow
    with the stream, and it overfit in cross-entropy); a head that reads a normalisation's
    output (ViT, Llama) does not: decaying it shrinks the logits themselves and cost train
    loss. Embeddings, gains and biases never do (docs/concepts.md §5, rule 6)."""
    inside = {a.name for a in body + weighted}
    marked = [a for a in body if is_orthogonalized(a.kind)] if decay > 0 else []
    designed = [a for a in weighted if is_orthogonalized(a.kind)]
    readers = []
    for name, specs in uses.items():
        atom = atoms.get(name)
        if atom is None or name in inside or not is_orthogonalized(atom.kind):
            continue
        gains = [atom_gain(u, atom.kind, scales) for _, _, u in specs if u is not None]
        if gains and max(gains) > STREAM_INPUT_SCALE:
            readers.append(atom)
    for a in marked:
        a.decay = decay
    for a in designed:
        a.decay = WEIGHTED_BRANCH_DECAY
    if designed:
        diag.notes.append(f"weighted residual branches: their {len(designed)} matrices get weight decay "
                          f"{WEIGHTED_BRANCH_DECAY:g} with compile(weight_decay=\"auto\")")
    for a in readers:
        a.decay = STREAM_READER_DECAY
    if marked:
        diag.notes.append(f"residual branches: their {len(marked)} matrices get weight decay {decay:g} with "
                          "compile(weight_decay=\"auto\")")
    if readers:
        diag.notes.append(f"{', '.join(a.name for a in readers)} (reading the unnormalised stream) "
                          f"{'get' if len(readers) > 1 else 'gets'} weight decay {STREAM_READER_DECAY:g} with "
                          "compile(weight_decay=\"auto\")")


def _weigh_fused_projections(atoms: dict[str, Atom], uses: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]],
                             cap: Captured, live: set[fx.Node], kinds: Mapping[str, str],
                             diag: Diagnostics) -> dict[str, int]:
    """A matrix whose output is read in k disjoint parts (a fused q/k/v or gate/up
    projection, in any layout: `patterns.output_parts`) weighs k matrices: its mass, and its
    bias's, × k; and each part is orthogonalized on its own where the layout allows.

    Why: fusing separate projections into one matrix is a layout choice, not a change of the
    network, so it must not change the steps. Counted as one atom, a fused q/k/v projection
    got a third of the mass that the same three matrices get unfused, while its downstream
    summed all three parts: each part moved a third as far as in Llama, and GPT-NeoX trained
    to 2.13 where its matrices weighed as three reached 1.87 (docs/concepts.md §5)."""
    by_node: dict[fx.Node, list[str]] = {}
    for name, specs in uses.items():
        if name in atoms and name not in kinds and len(specs) == 1 and atoms[name].kind in ("linear", "bias"):
            by_node.setdefault(specs[0][1], []).append(name)
    fused, counts = [], {}
    for node, names in by_node.items():
        weights = [n for n in names if atoms[n].kind == "linear" and len(atoms[n].shape) == 2]
        if len(weights) != 1:
            continue
        atom = atoms[weights[0]]
        val = node.meta.get("val", node.meta.get("example_value"))
        rows = int(val.shape[-1]) if getattr(val, "shape", None) else 0
        if rows not in atom.shape:
            continue
        parts = output_parts(node, rows, cap, live)
        if not parts:
            continue
        k = len(parts)
        for n in names:
            atoms[n].mass *= k
            atoms[n].note = f"{atoms[n].note}; output read in {k} parts: weighs {k}"
            counts[n] = k
        _orthogonalize_parts(atom, parts, rows)
        fused.append(f"{atom.name} ×{k}")
    if fused:
        diag.notes.append(f"fused projections weigh their parts: {', '.join(fused)}")
    return counts


def _orthogonalize_parts(atom: Atom, parts: list[list[int]], rows: int) -> None:
    """Give a fused matrix whose parts the matrix rule did not split one matrix view per part:
    contiguous parts as `part_options`, parts interleaved with a period (per-head q/k/v) as
    one batch. Other layouts keep the whole-matrix view (as Muon orthogonalizes them)."""
    o = atom.options
    if "parts" in o or (o.get("matrix") or [1])[0] != 1:
        return  # the matrix rule already split it
    out_in = atom.shape[0] == rows
    cols = atom.shape[1] if out_in else atom.shape[0]
    dim = 0 if out_in else 1
    firsts = sorted(parts, key=lambda p: p[0])
    if all(p == list(range(p[0], p[0] + len(p))) for p in firsts):  # contiguous blocks
        specs = []
        for p in firsts:
            n = len(p)
            view = matrix_options([n, cols], [0, 1], 1, n, cols) if out_in else matrix_options([cols, n], [1, 0], 1, n, cols)
            specs.append((p[0], n, view))
        atom.options = part_options(specs, dim)
        return
    k, first = len(parts), firsts[0]
    g = next((i for i in range(1, len(first)) if first[i] != first[0] + i), len(first))  # one run's rows
    period = k * g
    if any(len(p) != len(first) for p in parts) or rows % period:
        return
    heads = rows // period
    label = {r: i for i, p in enumerate(firsts) for r in p}
    if any(label[r] != label[r % period] or label[r % period] != (r % period) // g for r in range(rows)):
        return
    if out_in:  # (heads, k, g, cols) -> (k, heads, g, cols)
        atom.options = matrix_options([heads, k, g, cols], [1, 0, 2, 3], k, heads * g, cols)
    else:       # (cols, heads, k, g) -> (k, heads, g, cols)
        atom.options = matrix_options([cols, heads, k, g], [2, 1, 3, 0], k, heads * g, cols)


def _mark_stems(atoms: dict[str, Atom], uses: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]],
                scales: Scales, kinds: Mapping[str, str], diag: Diagnostics) -> None:
    """A conv that reads the model's raw input (an image stem, a ViT's patch embedding: no
    trainable op between a float model input and it) becomes a `stem` atom: sign dual, a
    gain's mass.

    Why: the per-kernel-position norm sees a 1- or 3-channel input as K matrices of C_in
    columns and gives each position 1/K of the budget (1/49 for a 7×7 stem), and raw pixels
    have no RMS geometry for a matrix norm to assume. Moved entrywise, as Muon+AdamW's AdamW
    moves it, ViT's and ResNet's test losses fell (docs/concepts.md §5, rule 8). A linear
    layer reading raw features keeps its matrix norm: an MLP on digits trained worse with
    the rule."""
    for name, specs in uses.items():
        atom = atoms.get(name)
        if atom is None or name in kinds or atom.kind != "conv" or not specs:
            continue
        if all(u is not None and _reads_raw_input(u, scales) for _, _, u in specs):
            stem = kind_of("stem")
            atom.kind, atom.dual, atom.norm, atom.mass = stem.name, stem.dual, stem.norm, stem.mass
            if stem.dual != "orthogonalize":  # entrywise: the conv's matrix view no longer applies
                atom.options = {}
            atom.note = f"{atom.note}; reads the raw input: a stem ({stem.dual} dual, mass {stem.mass:g})"
            diag.notes.append(f"stem: {name} reads the model's raw input ({stem.dual} dual, mass {stem.mass:g})")


def _mark_channel_convs(atoms: dict[str, Atom], uses: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]],
                        scales: Scales, kinds: Mapping[str, str], diag: Diagnostics) -> None:
    """A conv whose output only a BatchNorm reads (as its input) becomes a `channel_conv`
    atom: row-normalised dual (every output channel's filter moves by the same RMS), its
    budget divided by its K kernel positions (`budget_scale`), and no weight decay (only
    orthogonalised kinds decay).

    Why: BatchNorm divides each channel by its own batch statistics, so the network's output
    does not depend on the scale of any one filter, only on its direction. A step of equal
    RMS per filter turns every channel by the same relative amount; decay on such a weight
    only shrinks it, which raises that turning rate as training goes on. On transformers'
    ResNet (16 seeds at 4 and 8 layers, 8 at 2 and 16) this lowered the test loss by up to
    0.04 and moved train loss by at most 0.002; orthogonalised per kernel position without
    decay it cost 16 layers 0.014 of train loss (docs/concepts.md §5, rule 10)."""
    kind, marked = kind_of("channel_conv"), []
    for name, specs in uses.items():
        atom = atoms.get(name)
        if atom is None or name in kinds or atom.kind != "conv" or not specs or len(atom.shape) < 3:
            continue
        if all(u is not None and _read_only_by_batch_norm(u.node, scales) for _, _, u in specs):
            positions = math.prod(atom.shape[2:])
            atom.kind, atom.dual, atom.norm, atom.options = kind.name, kind.dual, kind.norm, {}
            atom.budget_scale /= positions
            atom.note = f"{atom.note}; read only by a BatchNorm: moved per output channel, budget / {positions}"
            marked.append(name)
    if marked:
        diag.notes.append(f"channel convs: {len(marked)} conv(s) read only by a BatchNorm move per output "
                          f"channel ({kind.dual} dual, budget / kernel positions, no decay; "
                          "channel_convs=False keeps them convs)")


def _read_only_by_batch_norm(node: fx.Node, scales: Scales) -> bool:
    """Every user of the op's output is a BatchNorm that normalises it (its first argument)."""
    users = list(node.users)
    return bool(users) and all(ops.op_name(u, scales.modules) == "batch_norm" and u.args and u.args[0] is node
                               for u in users)


def _reads_raw_input(use: Use, scales: Scales) -> bool:
    """The op's signal operands exist and every one was last transformed by no weight: its
    roots (`Scales.roots`, as for gates) are all graph inputs."""
    data = [v for k, v in use.args.items()
            if k != use.key and isinstance(v, fx.Node) and v in scales.live and v not in scales.weights]
    return bool(data) and all(r.op == "placeholder" for v in data for r in scales.roots(v))


def _weigh_position_tables(atoms: dict[str, Atom], uses: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]],
                           live: set[fx.Node], diag: Diagnostics) -> None:
    """A table read only at indices that carry no signal (positions `arange(T)`, a constant
    token-type buffer, `wpe[:T]`) adds the same row to every sequence, at every step: a bias
    indexed by position. Beside a body, where every outer atom holds a fixed share, it takes
    `POSITION_TABLE_MASS`. With an embedding's full share GPT-2's position rows moved 11×
    faster than its tied token rows; with a bias's (0.1) BERT's position and token-type rows
    still grew to 4× its token rows, and after its LayerNorm the sum carried little of the
    token (docs/concepts.md §5)."""
    for name, specs in uses.items():
        atom = atoms.get(name)
        if atom is None or atom.kind != "embedding" or not specs or name in diag.tied:
            continue
        if all(u is not None and _fixed_rows(u, live) for _, _, u in specs):
            atom.mass = POSITION_TABLE_MASS
            atom.note = f"{atom.note}; read at fixed indices (a position table): mass {POSITION_TABLE_MASS:g}"


#: Ops a head's input may pass through between the normalisation and the head: casts and
#: views, and dropout (the identity at evaluation).
_HEAD_PASSTHROUGH = SCALE_PASSTHROUGH | {"dropout", "identity", "_to_copy"}


def _weigh_tied_head_norm(atoms: dict[str, Atom], uses: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]],
                          cap: Captured, scales: Scales, diag: Diagnostics) -> None:
    """The gains and biases applied to the activation that a tied head reads (the final or
    head-transform LayerNorm in front of a table shared with the token embedding) take
    `TIED_HEAD_NORM_MASS`.

    Why: a tied table is sized in the embedding's norm and moves at the embedding's budget,
    which rule 3 keeps small (its head use counts S·√d); the logits' scale and offset then
    move mostly through the gain and bias in front of the head. With a gain's mass (0.1)
    16-layer BERT stayed 0.014 / 0.009 behind AdamW; three times it gained 0.010 / 0.009 over
    16 seeds, lowered the held-out loss at 4 and 8 layers too, and cost GPT-2 at most 0.003
    train / 0.006 held-out (docs/concepts.md §5, rule 9)."""
    owners: dict[fx.Node, set[str]] = {}
    for name, specs in uses.items():
        atom = atoms.get(name)
        if atom is not None and atom.kind in ("gain", "bias"):
            for _, node, _ in specs:
                owners.setdefault(node, set()).add(name)
    found: dict[str, str] = {}
    for name in diag.tied:
        atom = atoms.get(name)
        if atom is None or atom.kind != "embedding":
            continue
        for _, _, u in uses.get(name, []):
            if u is None or u.op not in MATRIX_OPS:
                continue
            for key, x in u.args.items():
                if key != u.key and isinstance(x, fx.Node) and x in scales.live and x not in scales.weights:
                    for g in _gains_in_front(x, owners, cap, scales):
                        found.setdefault(g, name)
    for g, table in found.items():
        atoms[g].mass = TIED_HEAD_NORM_MASS
        atoms[g].note = f"{atoms[g].note}; in front of the tied head {table}: mass {TIED_HEAD_NORM_MASS:g}"
    if found:
        diag.notes.append(f"tied head: {', '.join(found)} (in front of {', '.join(sorted(set(found.values())))}) "
                          f"take mass {TIED_HEAD_NORM_MASS:g}")


def _gains_in_front(x: fx.Node, owners: dict[fx.Node, set[str]], cap: Captured, scales: Scales) -> list[str]:
    """The gain and bias atoms applied to `x` on its way from the last normalisation (or the
    last op that is neither a gain/bias use nor a passthrough): walking up one signal
    operand at a time."""
    found: list[str] = []
    seen: set[fx.Node] = set()
    while x not in seen:
        seen.add(x)
        here = sorted(owners.get(x, ()))
        found += here
        op = ops.op_name(x, cap.modules)
        if op in NORMALISATIONS:
            break
        signal = [i for _, i in ops.tensor_inputs(x)
                  if i in scales.live and i not in scales.weights and not is_integer(i)]
        if len(signal) != 1 or not (here or op in _HEAD_PASSTHROUGH):
            break
        x = signal[0]
    return found


def _fixed_rows(use: Use, live: set[fx.Node]) -> bool:
    """The table is read at rows that carry no token: constant indices, or indices computed
    from the input ids (RoBERTa's and MPNet's positions, `cumsum(ids != pad)`), not the ids."""
    if use.op == "embedding":
        return not any(isinstance(v, fx.Node) and k != use.key and v in live and _reads_ids(v)
                       for k, v in use.args.items())
    return use.indexed  # sliced by constants on its way to an add: `x + wpe[:T]`


#: Ops between a model input and a lookup that keep the input's ids as they are.
_ID_PASSTHROUGH = {"view", "reshape", "to", "contiguous", "clone", "alias", "unsqueeze", "squeeze", "flatten",
                   "expand", "getitem", "slice", "select", "narrow", "long", "int", "type"}


def _reads_ids(index: fx.Node) -> bool:
    """`index` is a model input's ids, moved or cast but not computed on."""
    while index.op != "placeholder":
        if ops.op_name(index) not in _ID_PASSTHROUGH or not index.args or not isinstance(index.args[0], fx.Node):
            return False
        index = index.args[0]
    return True


def _weigh_body(inside: list[Atom], total: float, diag: Diagnostics) -> list[Atom]:
    """Give the atoms used inside plain residual branches (`inside`) `total` mass between
    them and return them; [] if there are none (nothing changed)."""
    own = sum(a.mass for a in inside)
    if not inside or own <= 0:
        return []
    for a in inside:
        a.mass = total * a.mass / own
    diag.notes.append(f"residual body: {len(inside)} atoms inside residual branches share mass {total:g} "
                      f"(body_mass; one unit per atom would give them {own:g})")
    return inside


def _residuals(cap: Captured, scales: Scales, plain_only: bool) -> Residuals:
    """The residual branches of plain joins only (`x + f(x)`, the body that shares
    `BODY_MASS`), or of any sum, explicitly weighted ones included (modula's
    `(1 − 1/L)·x + f(x)/L`, whose masses are designed but whose matrices still grow)."""
    join = _plain_join(cap, scales) if plain_only else _any_join(cap)
    return residuals(cap.graph, scales.live, join, lambda n: n not in scales.weights and not is_integer(n))


def _atoms_in(nodes: set[fx.Node], atoms: dict[str, Atom],
              uses: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]]) -> list[Atom]:
    """The atoms with a use among `nodes`, in `uses` order."""
    return [atoms[n] for n, specs in uses.items() if n in atoms and any(node in nodes for _, node, _ in specs)]


def _any_join(cap: Captured) -> Callable[[fx.Node], bool]:
    """Sums of every kind, explicitly weighted ones included (modula's convex residuals)."""
    return lambda node: ops.op_name(node, cap.modules) in SUMS


def _has_weighted_join(cap: Captured, scales: Scales) -> bool:
    """Whether some sum is explicitly weighted; without one, every join is plain and the walk
    of plain joins already is the walk of all of them."""
    every, plain = _any_join(cap), _plain_join(cap, scales)
    return any(every(node) and not plain(node) for node in cap.graph.nodes)


def _plain_join(cap: Captured, scales: Scales) -> Callable[[fx.Node], bool]:
    """Plain sums (`x + f(x)`): no term is explicitly weighted."""
    def join(node: fx.Node) -> bool:
        return ops.op_name(node, cap.modules) in SUMS and not any(
            scales.scaled_explicitly(i) for _, i in ops.tensor_inputs(node) if i in scales.live)
    return join


def _refuse_unsupported(trainable: Mapping[str, torch.Tensor]) -> None:
    """Parameters the duality maps would silently damage: say so before anything runs."""
    complex_ = [n for n, p in trainable.items() if p.is_complex()]
    if complex_:
        raise ValueError(f"complex parameters are not supported (their updates would lose the imaginary "
                         f"part): {', '.join(complex_[:5])}; store them as real pairs (torch.view_as_real) "
                         "or optimize them with another optimizer")


# ---------------------------------------------------------------------------------------
# 1. Sensitivities


def _live(cap: Captured) -> set[fx.Node]:
    """Nodes whose value depends on a model input or a trainable parameter.

    Shape and dtype reads (`x.shape`, `x.size(1)`, and the ints computed from them for a
    `view`) carry no signal: with symbolic tracing they are nodes, but not live ones."""
    live: set[fx.Node] = set()
    for node in cap.graph.nodes:
        if node in cap.params or (node.op == "placeholder" and node not in cap.constants):
            live.add(node)
        elif PARAM_FLOW.get(ops.op_name(node, cap.modules)) == "metadata":
            continue
        elif any(i in live for i in node.all_input_nodes):
            live.add(node)
    return live


def _bond(b: BondInput, scales: Scales | None) -> tuple[float, bool]:
    return bond_sensitivity(b) if scales is None else scaled_bond(b, scales)


def downstream(cap: Captured, scales: Scales | None = None) -> tuple[dict[fx.Node, float], dict[str, int]]:
    """D of every node (reverse path-sum), and the ops whose sensitivity had to be assumed.

    Without `scales` the bonds are modula's (every activation unit-sized); with them, the
    "scale" mode's (see `normgraph.analysis.scale`)."""
    def p_of(node: fx.Node) -> float:  # how the uses of `node` combine: Σ (s·D(use))^p, then ^(1/p)
        return scales.p_of_uses(node) if scales is not None else 1.0

    D: dict[fx.Node, float] = {n: 0.0 for n in cap.graph.nodes}  # Σ over uses of (s·D(use))^p
    for out in cap.outputs:
        D[out] += 1.0
    live = scales.live if scales is not None else _live(cap)
    rotations = scales.rotations if scales is not None else rotary_joins(cap, live)
    # attention written out op by op reads as SDPA does in the scale modes (modula's own
    # algebra counts every path of it, as its bond for SDPA counts q, k and v a whole each)
    attention = attention_reads(cap, live, scales.weights) if scales is not None else {}
    assumed: dict[str, int] = {}
    for node in reversed(cap.graph.nodes):
        d = D[node] ** (1.0 / p_of(node))  # every use of `node` comes after it: its sum is complete
        if d == 0.0 or node.op in ("placeholder", "get_attr", "output"):
            continue
        if node in rotations:  # a rotation of one activation: an isometry, one bond of 1
            D[rotations[node]] += d ** p_of(rotations[node])
            continue
        if node in attention:  # as `_attention_bond` reads SDPA: a third each, q and k relative
            read, share = attention[node], d / 3.0
            sv = scales(read.value)
            D[read.value] += share ** p_of(read.value)
            for a, b in read.products:
                for x in (a, b):
                    D[x] += (share * sv / (scales(x) or 1.0)) ** p_of(x)
            for t in read.terms:
                D[t] += (share * sv) ** p_of(t)
            continue
        op = ops.op_name(node, cap.modules)
        entry = module_entry(cap.modules[str(node.target)]) if node.op == "call_module" else None
        args = None
        counted = False
        for key, inp in ops.tensor_inputs(node):
            if inp not in live:
                continue
            if entry is not None:
                s, was_assumed = entry.sensitivity, False
            else:
                args = args if args is not None else ops.arguments(node)
                s, was_assumed = _bond(BondInput(node, op, ops.key_of(args, inp), args, inp), scales)
            if was_assumed and not counted:
                assumed[op] = assumed.get(op, 0) + 1
                counted = True
            D[inp] += (s * d) ** p_of(inp)
    return {n: v ** (1.0 / p_of(n)) for n, v in D.items()}, assumed


# ---------------------------------------------------------------------------------------
# 2. Atoms


def _uses_of(param: fx.Node, shape: tuple[int, ...], modules: dict[str, torch.nn.Module],
             conv_mode: str, split_packed: bool) -> list[tuple[Use, str]]:
    """Follow a parameter through data movement to the ops that consume it.

    Returns (use, irregularity) pairs; irregularity is "" when the path is understood.
    """
    found: list[tuple[Use, str]] = []
    stack: list[tuple[fx.Node, bool, bool, str]] = [(param, False, False, "")]
    while stack:
        value, transposed, indexed, odd = stack.pop()
        for user in value.users:
            op = ops.op_name(user, modules)
            first = user.args[0] if user.args else None
            flow = PARAM_FLOW.get(op)
            if flow == "metadata":
                continue
            if first is value and (flow == "passthrough" or op == "_weight_norm" or _shifted(user, op, value)):
                stack.append((user, transposed, indexed, odd))
            elif first is value and flow == "transpose":
                swap = _swaps_last_two(user, op, len(shape) - (1 if indexed else 0))
                stack.append((user, transposed ^ bool(swap), indexed,
                              odd or ("" if swap is not None else f"unsupported {op}")))
            elif first is value and flow == "index":
                stack.append((user, transposed, True, odd))
            else:
                args = ops.arguments(user)
                found.append((Use(user, op, ops.key_of(args, value), args, shape, transposed,
                                  indexed, conv_mode, split_packed), odd))
    found.sort(key=lambda u: _order(u[0].node))
    return found


def _shifted(node: fx.Node, op: str, value: fx.Node) -> bool:
    """`w + 1`, `1 - w`: a parameter shifted by a constant keeps its role (a gain `x·(1 + w)`)."""
    if op not in ("add", "sub", "rsub"):
        return False
    others = [a for a in (*node.args, *node.kwargs.values()) if a is not value]
    return bool(others) and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in others)


def _order(node: fx.Node) -> int:
    """Position of a node in its graph (fx keeps nodes in execution order)."""
    idx = node.meta.get("_normgraph_order")
    if idx is None:
        for i, n in enumerate(node.graph.nodes):
            n.meta["_normgraph_order"] = i
        idx = node.meta["_normgraph_order"]
    return idx


def _swaps_last_two(node: fx.Node, op: str, ndim: int) -> bool | None:
    """True/False if `node` swaps/keeps the last two dims; None if it permutes otherwise."""
    if op == "t":
        return True
    if op == "numpy_T":  # reverses every dim: a swap of the last two only for a matrix
        return True if ndim == 2 else None
    a = ops.arguments(node)
    if op in ("transpose", "swapaxes"):
        d0, d1 = ops.arg(a, "dim0", 1), ops.arg(a, "dim1", 2)
        if not isinstance(d0, int) or not isinstance(d1, int):
            return None
        pair = {d0 % ndim, d1 % ndim} if ndim else set()
        return True if pair == {ndim - 2, ndim - 1} else (False if d0 % ndim == d1 % ndim else None)
    if op == "permute":
        dims = ops.arg(a, "dims", 1)
        if isinstance(dims, (list, tuple)) and len(dims) == ndim:
            dims = [d % ndim for d in dims]
            if dims == list(range(ndim)):
                return False
            if dims == list(range(ndim - 2)) + [ndim - 1, ndim - 2]:
                return True
    return None


def classify(cap: Captured, trainable: Mapping[str, torch.Tensor], conv_mode: str,
             split_packed: bool) -> dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]]:
    """Each parameter's (atom spec, consuming node, use) per use; an empty list if never
    reached. The use is None inside an opaque module."""
    found: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]] = {name: [] for name in trainable}
    for node, name in cap.params.items():
        if name not in trainable:  # an empty parameter: nothing to update
            continue
        shape = tuple(trainable[name].shape)
        for use, odd in _uses_of(node, shape, cap.modules, conv_mode, split_packed):
            rule = ATOM_RULES.get(use.op)
            spec = None if odd or rule is None else rule(use)
            if spec is None:
                if odd:
                    why = f"reaches {use.op} (node {use.node.name}) through an {odd}"
                elif rule is None:
                    why = f"used by {use.op} (node {use.node.name}), which has no atom rule"
                else:
                    why = f"used by {use.op} (node {use.node.name}) as argument {use.key!r}, which its rule does not cover"
                spec = AtomSpec("fallback", note=why)
            found[name].append((spec, use.node, use))
    for node in cap.graph.nodes:  # opaque (leaf) modules own their parameters' rules
        if node.op != "call_module":
            continue
        mod = cap.modules[str(node.target)]
        entry = module_entry(mod)
        specs = entry.rule(mod, conv_mode) if entry is not None else {}
        for local, p in mod.named_parameters():
            name = f"{node.target}.{local}"
            if name in found:
                spec = specs.get(local) or AtomSpec(
                    "fallback", note=f"inside opaque module {type(mod).__name__}, which has no rule for it")
                found[name].append((spec, node, None))
    return found


def _choose(name: str, specs: list[tuple[AtomSpec, fx.Node, Use | None]], override: str | None) -> AtomSpec:
    """The spec a (possibly shared) parameter takes: the override's kind, else its first use's."""
    if override is None:
        return specs[0][0]
    for spec, _, _ in specs:
        if spec.kind == override:
            return spec
    if not is_orthogonalized(override):  # needs no matrix view: any use will do
        return AtomSpec(override, note=f"kind set by the user ({override})")
    raise ValueError(f"kinds[{name!r}] = {override!r}, but no use of {name} is a {override} "
                     f"(its uses: {', '.join(f'{s.kind} in {n.name}' for s, n, _ in specs)})")


def _graph_atoms(trainable: Mapping[str, torch.Tensor],
                 uses: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]], D: dict[fx.Node, float],
                 kinds: Mapping[str, str], diag: Diagnostics, scales: Scales | None = None) -> dict[str, Atom]:
    """One atom per parameter; its downstream is the sum over its uses of D(use's output),
    each times (in the "scale" mode) the scale of what the parameter multiplies there."""
    atoms: dict[str, Atom] = {}
    for name, p in trainable.items():
        specs = uses[name]
        if not specs:  # unused: no share of the mass (the others' budgets must not shrink)
            atoms[name] = _atom(name, p, AtomSpec("fallback", note="never used by the captured graph"), 1.0, [])
            atoms[name].mass = 0.0
            diag.unreached.append(name)
            continue
        spec = _choose(name, specs, kinds.get(name))
        d = _combine([D[n] * (atom_gain(u, spec.kind, scales) if scales is not None and u is not None else 1.0)
                      for _, n, u in specs], scales.p_of_tied() if scales is not None else 1.0)
        nodes = [n.name for _, n, _ in specs]
        if len(specs) > 1:
            diag.tied[name] = [f"{s.kind} ({n.name})" for s, n, _ in specs]
            spec = AtomSpec(spec.kind, spec.fan_in, spec.fan_out, spec.options,
                            f"{spec.note}; shared by {len(specs)} ops: norm of the "
                            f"{'first use' if name not in kinds else 'kind set in kinds='}, D combined over its uses")
        if spec.kind == "fallback":
            diag.fallbacks[name] = f"{spec.note}; {FALLBACK_NOTE}"
        if d == 0.0:  # used, but no bond rule sees a path to an output: downstream taken as 1
            diag.unreached.append(name)
            d = 1.0
        atoms[name] = _atom(name, p, spec, d, nodes)
    return atoms


def _combine(values: list[float], p: float) -> float:
    """A tied parameter's downstream over its uses: the sum (p = 1) or the ℓp sum."""
    return sum(v ** p for v in values) ** (1.0 / p)


def _module_atoms(model: torch.nn.Module, trainable: Mapping[str, torch.Tensor], conv_mode: str,
                  diag: Diagnostics) -> dict[str, Atom]:
    """Atoms from the modules that own parameters (no graph: every downstream is 1)."""
    atoms: dict[str, Atom] = {}
    for mod_name, mod in model.named_modules():
        entry = module_entry(mod)
        specs = entry.rule(mod, conv_mode) if entry is not None else {}
        for local, p in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{local}" if mod_name else local
            if name not in trainable or name in atoms:
                continue
            spec = specs.get(local)
            if spec is None:
                spec = AtomSpec("fallback", note=f"{type(mod).__name__} has no module rule")
                diag.fallbacks[name] = f"{spec.note}; {FALLBACK_NOTE}"
            atoms[name] = _atom(name, p, spec, 1.0, [])
    for name, p in trainable.items():  # parameters of opaque modules' children, in order
        if name not in atoms:
            atoms[name] = _atom(name, p, AtomSpec("fallback", note="no module rule"), 1.0, [])
            diag.fallbacks[name] = f"no module rule; {FALLBACK_NOTE}"
    return {n: atoms[n] for n in trainable}


def _atom(name: str, p: torch.Tensor, spec: AtomSpec, d: float, uses: list[str]) -> Atom:
    return Atom(name=name, kind=spec.kind, shape=tuple(p.shape), dtype=str(p.dtype).replace("torch.", ""),
                norm=kind_of(spec.kind).norm, mass=kind_of(spec.kind).mass,
                sensitivity=1.0, downstream=d, dual=kind_of(spec.kind).dual,
                fan_in=spec.fan_in, fan_out=spec.fan_out, options=dict(spec.options),
                uses=uses, note=spec.note)


def _check_kinds(kinds: Mapping[str, str], trainable: Mapping[str, torch.Tensor]) -> None:
    unknown = [k for k in kinds if k not in trainable]
    if unknown:
        raise ValueError(f"kinds= names no trainable parameter: {', '.join(unknown)}")


# ---------------------------------------------------------------------------------------
# 3. Masses and 4. budgets


def apply_masses(atoms: dict[str, Atom], masses: Mapping[str, float]) -> None:
    """Set each key's total mass over the atoms it governs (the longest matching key wins)."""
    if not masses:
        return
    governed: dict[str, list[Atom]] = {k: [] for k in masses}
    for atom in atoms.values():
        best = None
        for key in masses:
            if atom.name == key or atom.name.startswith(key + ".") or key == "":
                if best is None or len(key) > len(best):
                    best = key
        if best is not None:
            governed[best].append(atom)
    empty = [k for k, v in governed.items() if not v]
    if empty:
        names = sorted({a.name.rsplit(".", 1)[0] for a in atoms.values()})
        raise ValueError(f"masses key(s) {', '.join(map(repr, empty))} match no trainable parameter "
                         f"(keys are module-name prefixes or parameter names; modules with "
                         f"parameters: {', '.join(names[:12])}{' …' if len(names) > 12 else ''})")
    for key, group in governed.items():
        total = float(masses[key])
        if not (math.isfinite(total) and total >= 0):
            raise ValueError(f"masses[{key!r}] = {total}: masses must be finite and non-negative")
        own = sum(a.mass for a in group)
        for a in group:
            a.mass = total * a.mass / own if own > 0 else total / len(group)


def _budgets(atoms: dict[str, Atom]) -> None:
    total = sum(a.mass for a in atoms.values())
    if total <= 0:
        raise ValueError("the total mass is 0: at least one atom needs a positive mass")
    for a in atoms.values():
        a.budget = budget_of(a.mass, total, a.downstream, a.budget_scale)


#: Largest/smallest budget among matrix and embedding atoms above which analysis warns. At a
#: ratio of 1e4 the smallest atom moves 1e-4 as far as the largest per step: with lr set for
#: the largest it takes ~10⁴ steps to move it by its own norm, i.e. it is frozen in practice.
SPREAD_WARNING = 1e4


def _warn_spread(atoms: dict[str, Atom], cap: Captured, D: dict[fx.Node, float],
                 scales: Scales | None, diag: Diagnostics) -> None:
    """Warn (and note in diagnostics) when budgets span more than `SPREAD_WARNING`, naming
    the ops along the smallest atom's path to the output that amplify its downstream most."""
    weights = [a for a in atoms.values() if a.dual in ("orthogonalize", "row_normalize") and a.budget > 0]
    if len(weights) < 2:
        return
    lo = min(weights, key=lambda a: a.budget)
    hi = max(weights, key=lambda a: a.budget)
    if hi.budget / lo.budget <= SPREAD_WARNING:
        return
    by_name = {n.name: n for n in cap.graph.nodes}
    start = by_name.get(lo.uses[0]) if lo.uses else None
    steps = _amplifying_path(start, cap, D, scales) if start is not None else []
    where = (" Along its path to the output the downstream grows most at: " + ", ".join(steps)
             if steps else "")
    msg = (f"budgets span {hi.budget / lo.budget:.3g}× ({lo.name} {lo.budget:.3g} vs {hi.name} "
           f"{hi.budget:.3g}): {lo.name} will barely move.{where}. If the model scales its residual "
           "branches by hand, check sensitivity= (\"hybrid\", the default, and \"scale\" read plain "
           "x + f(x) streams); set masses= to rebalance.")
    diag.notes.append("warning: " + msg)
    warnings.warn("normgraph: " + msg, stacklevel=3)


def _amplifying_path(start: fx.Node, cap: Captured, D: dict[fx.Node, float],
                     scales: Scales | None, limit: int = 6) -> list[str]:
    """Follow the largest contribution to D from `start` to the output; name the ops where
    D drops most going forward (i.e. where the backward path sum multiplies)."""
    node, seen, gains = start, set(), []
    while node is not None and node.op != "output" and node not in seen:
        seen.add(node)
        best, best_c = None, 0.0
        for user in node.users:
            if user.op == "output":
                continue
            args = ops.arguments(user)
            s, _ = _bond(BondInput(user, ops.op_name(user, cap.modules), ops.key_of(args, node), args, node), scales)
            if s * D[user] > best_c:
                best, best_c = user, s * D[user]
        if best is not None and D[best] > 0 and D[node] / D[best] > 1.5:
            gains.append((D[node] / D[best], f"{best.name} ({ops.op_name(best, cap.modules)}, ×{D[node] / D[best]:.2g})"))
        node = best
    gains.sort(key=lambda g: -g[0])
    return [g[1] for g in gains[:limit]]


# ---------------------------------------------------------------------------------------
# The networkx view


def _atom_attrs(atom: Atom) -> dict[str, Any]:
    return {"type": "atom", "kind": atom.kind, "norm": atom.norm, "shape": atom.shape,
            "mass": atom.mass, "sensitivity": atom.sensitivity, "downstream": atom.downstream,
            "budget": atom.budget}


def _to_networkx(cap: Captured, D: dict[fx.Node, float],
                 uses: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]],
                 scales: Scales | None = None) -> nx.DiGraph:
    """Ops that carry activations (D > 0), edges labelled with sensitivities, atoms → their ops."""
    g = nx.DiGraph()
    keep = {n for n in cap.graph.nodes if D[n] > 0 and n not in cap.params and n.op != "get_attr"}
    for n in keep:
        g.add_node(n.name, type="op", op=ops.op_name(n, cap.modules), downstream=D[n],
                   **({"scale": scales(n)} if scales is not None else {}))
    for n in keep:
        if n.op in ("placeholder", "output"):
            continue
        entry = module_entry(cap.modules[str(n.target)]) if n.op == "call_module" else None
        args = ops.arguments(n) if entry is None else {}
        for key, inp in ops.tensor_inputs(n):
            if inp in keep:
                s = entry.sensitivity if entry is not None else _bond(
                    BondInput(n, g.nodes[n.name]["op"], ops.key_of(args, inp), args, inp), scales)[0]
                g.add_edge(inp.name, n.name, sensitivity=s)
    for name, specs in uses.items():
        for _, node, _ in specs:
            if node.name not in g:
                g.add_node(node.name, type="op", op=ops.op_name(node, cap.modules), downstream=D[node])
            g.add_edge(name, node.name)
    return g
