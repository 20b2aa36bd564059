"""The default's steps, in order: what "hybrid" mode does after the downstreams are read.

`apply_default` is the whole default in one place. Each step is a plain function over the
atoms, with a docstring that says why it is there and what measurement kept it, a switch in
`AnalysisOptions`, and a test (docs/concepts.md §5 has the measurements; tests/ the
hand-derived values):

1. fused projections weigh their parts       `fused_projections`   tests/test_patterns.py
2. a conv reading the raw input is a stem    `stems`               tests/test_stems.py
3. the residual body shares a fixed mass     `body_mass`           tests/test_scale.py
4. position tables added to the token rows take a small mass (position terms of attention
   keep a table's)                            `position_table_mass` tests/test_scale.py, test_patterns.py
5. the gains in front of a tied head         `tied_head_norm_mass` tests/test_tied_head_norm.py
6. the body read in quadrature               `body_reference`      tests/test_body_quadrature.py
7. the body read depth-flat                  `body_profile`        tests/test_body_profile.py
8. a conv read only by a BatchNorm           `channel_convs`       tests/test_channel_convs.py
9. weight decay: stream readers and weighted residual branches (plain branches: `body_decay`, 0)
                                                                   tests/test_body_quadrature.py
10. no budget above `max_budget` (0.5), once the budgets are set (`cap_budgets`, called by
   `analyze` after `masses=`)                 `max_budget`          tests/test_max_budget.py

Reading attention written out (`attention_patterns`), partial rotary, a table's multiplier
(`table_multipliers`) and an activation read inside several branches (`branch_fanout`, on
`plain_residuals`) happen earlier, while the downstreams are read (`analysis.patterns`,
`analysis.scale`, `analysis.analyze.downstream`).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch.fx as fx

from ..core.graph import Atom, Diagnostics
from ..core.kinds import is_orthogonalized, kind_of
from ..core.layout import matrix_options, part_options
from . import ops
from .options import AnalysisOptions
from .patterns import output_parts
from .residual import Residuals, residuals
from .rules import AtomSpec, Use
from .scale import NORMALISATIONS, MATRIX_OPS, SCALE_PASSTHROUGH, SUMS, Scales, atom_gain, is_integer
from .trace import Captured

#: Input scale above which a matrix outside the body reads an unnormalised residual stream
#: (and decays): a normalisation's output has scale 1 at initialisation, a stream after one
#: plain join √2.
STREAM_INPUT_SCALE = 1.2

Uses = dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]]


def apply_default(atoms: dict[str, Atom], uses: Uses, cap: Captured, scales: Scales, D: dict[fx.Node, float],
                  sensitivity: str, kinds: Mapping[str, str], options: AnalysisOptions, diag: Diagnostics,
                  residual: Residuals | None = None) -> None:
    """The default's masses, budget scales and decays, step by step (see the module docstring).
    `residual`: the walk of plain joins (`plain_residuals`), when the caller already has it."""
    hybrid = sensitivity == "hybrid"
    body_mass = options.resolved_body_mass(sensitivity)
    plain = None
    if body_mass is not None:
        plain = residual if residual is not None else plain_residuals(cap, scales)
    parts = (_weigh_fused_projections(atoms, uses, cap, scales.live, kinds, diag,
                                      weigh=plain is not None and bool(plain.branch))
             if hybrid and options.fused_projections else {})
    if hybrid and options.stems:
        _mark_stems(atoms, uses, scales, kinds, diag)
    body = _weigh_body(_atoms_in(plain.body, atoms, uses), body_mass, diag) if plain is not None else []
    if body:
        _weigh_position_tables(atoms, uses, cap, scales, options.position_table_mass, diag,
                               terms=hybrid and options.position_terms)
        _weigh_tied_head_norm(atoms, uses, cap, scales, options.tied_head_norm_mass, diag)
        _read_body_in_quadrature(body, options.resolved_body_reference(), parts, diag)
        if options.body_profile == "flat":
            _flatten_body(body, uses, plain, D, diag)
    if hybrid and options.channel_convs:  # after the body: its 1/K joins budget_scale
        _mark_channel_convs(atoms, uses, scales, kinds, diag)
    if plain is not None:  # any residual, weighted ones too (modula's convex)
        every = _residuals(cap, scales, plain_only=False) if _has_weighted_join(cap, scales) else plain
        weighted = [a for a in _atoms_in(every.body, atoms, uses) if a not in body]
        _decay_body(body, weighted, atoms, uses, scales, options, diag)


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
                options: AnalysisOptions, diag: Diagnostics) -> None:
    """Mark the matrices inside residual branches (`body`: of any residual, weighted or plain),
    and the matrices that read the residual stream itself, for weight decay `decay`.

    Why: fixed-norm steps let a matrix grow without bound (a 4-layer ViT's q/k reached 3.5×
    the norms Muon's did, and it trained worse). Outside the body only a matrix whose input
    is the unnormalised stream decays (a ResNet's classifier after pooling: its logits grow
    with the stream, and it overfit in cross-entropy); a head that reads a normalisation's
    output (ViT, Llama) does not: decaying it shrinks the logits themselves and cost train
    loss. Embeddings, gains and biases never do (docs/concepts.md §5, rule 6)."""
    inside = {a.name for a in body + weighted}
    decay = options.resolved_body_decay()
    marked = [a for a in body if is_orthogonalized(a.kind)] if decay > 0 else []
    designed = [a for a in weighted if is_orthogonalized(a.kind)] if options.weighted_branch_decay > 0 else []
    readers = []
    for name, specs in uses.items():
        atom = atoms.get(name)
        if atom is None or name in inside or not is_orthogonalized(atom.kind):
            continue
        gains = [atom_gain(u, atom.kind, scales) for _, _, u in specs if u is not None]
        if gains and max(gains) > STREAM_INPUT_SCALE and options.stream_reader_decay > 0:
            readers.append(atom)
    for a in marked:
        a.decay = decay
    for a in designed:
        a.decay = options.weighted_branch_decay
    if designed:
        diag.notes.append(f"weighted residual branches: their {len(designed)} matrices get weight decay "
                          f"{options.weighted_branch_decay:g} with compile(weight_decay=\"auto\")")
    for a in readers:
        a.decay = options.stream_reader_decay
    if marked:
        diag.notes.append(f"residual branches: their {len(marked)} matrices get weight decay {decay:g} with "
                          "compile(weight_decay=\"auto\")")
    if readers:
        diag.notes.append(f"{', '.join(a.name for a in readers)} (reading the unnormalised stream) "
                          f"{'get' if len(readers) > 1 else 'gets'} weight decay {options.stream_reader_decay:g} with "
                          "compile(weight_decay=\"auto\")")


def _weigh_fused_projections(atoms: dict[str, Atom], uses: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]],
                             cap: Captured, live: set[fx.Node], kinds: Mapping[str, str],
                             diag: Diagnostics, weigh: bool = True) -> dict[str, int]:
    """A matrix whose output is read in k disjoint parts (a fused q/k/v or gate/up
    projection, in any layout: `patterns.output_parts`) weighs k matrices: its mass, and its
    bias's, × k (`weigh`: beside a residual body, whose total mass is fixed); and each part
    is orthogonalized on its own where the layout allows.

    Why: fusing separate projections into one matrix is a layout choice, not a change of the
    network, so it must not change the steps. Counted as one atom, a fused q/k/v projection
    got a third of the mass that the same three matrices get unfused, while its downstream
    summed all three parts: each part moved a third as far as in Llama, and GPT-NeoX trained
    to 2.13 where its matrices weighed as three reached 1.87 (docs/concepts.md §5). Without a
    body (modula's explicitly weighted residuals, the demo GPT) the masses are the ones the
    network was written with, and they stay: weighing the demo GPT's q/k/v as three cost it
    0.115 of train loss (1.279 → 1.394)."""
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
            if weigh:
                atoms[n].mass *= k
            atoms[n].note = f"{atoms[n].note}; output read in {k} parts" + (f": weighs {k}" if weigh else "")
            counts[n] = k
        _orthogonalize_parts(atom, parts, rows)
        fused.append(f"{atom.name} ×{k}" if weigh else atom.name)
    if fused:
        diag.notes.append(f"fused projections {'weigh' if weigh else 'orthogonalize'} their parts: {', '.join(fused)}")
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
    """A conv with more than one kernel position whose output only a BatchNorm reads (as its
    input) becomes a `channel_conv` atom: row-normalised dual (every output channel's filter
    moves by the same RMS), its budget divided by its K kernel positions (`budget_scale`),
    and no weight decay (only orthogonalised kinds decay). A 1×1 conv stays a `conv`: it is
    one matrix, orthogonalised (on the zoo, MobileNetV2's 1×1 expansions and projections as
    channel convs cost 0.11 train loss over three seeds; docs/concepts.md §5, rule 10).

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
        positions = math.prod(atom.shape[2:])
        if positions > 1 and all(u is not None and _read_only_by_batch_norm(u.node, scales) for _, _, u in specs):
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
                           cap: Captured, scales: Scales, mass: float, diag: Diagnostics,
                           terms: bool = True) -> None:
    """A table read only at indices that carry no signal (positions `arange(T)`, a constant
    token-type buffer, `wpe[:T]`) adds the same row to every sequence, at every step: a bias
    indexed by position. Where its rows are added to the token rows (`tok + pos`, before any
    matrix product) and beside a body, where every outer atom holds a fixed share, it takes
    `POSITION_TABLE_MASS`. With an embedding's full share GPT-2's position rows moved 11×
    faster than its tied token rows; with a bias's (0.1) BERT's position and token-type rows
    still grew to 4× its token rows, and after its LayerNorm the sum carried little of the
    token (docs/concepts.md §5, rule 4).

    A position table that is not added to the token rows is a term of attention: T5's and
    MPNet's relative-position biases (added to the scores), DeBERTa's relative embeddings,
    Swin's and BEiT's bias tables (read through an index buffer or an interpolation, which
    no atom rule knows: the fallback kind, whose mass is a bias's). Rule 4's reason does not
    hold for it, and at the small mass it did not move: T5's, MPNet's and BEiT's tables at
    10-100× their budget trained far better (docs/concepts.md §5, step 12). Such a table
    keeps the mass the steps before gave it, and an unknown one reads as a table, not a bias
    (`POSITION_TERM_MASS` for its kind's mass). `terms=False` (`position_terms`, and every
    mode but "hybrid") gives every table read at no token `mass`, as before the zoo."""
    for name, specs in uses.items():
        atom = atoms.get(name)
        if atom is None or not specs:
            continue
        table = (atom.kind == "embedding" and name not in diag.tied
                 and all(u is not None and _fixed_rows(u, scales.live) for _, _, u in specs))
        unknown = (terms and atom.kind == "fallback" and len(atom.shape) >= 2
                   and all(_reads_no_input(node, scales) for _, node, _ in specs))
        if not (table or unknown):
            continue
        if not terms or all(_added_to_token_rows(node, cap, scales) for _, node, _ in specs):
            if table:
                atom.mass = mass
                atom.note = f"{atom.note}; read at rows that carry no token (a position table): mass {mass:g}"
            continue
        if unknown:
            atom.mass *= POSITION_TERM_MASS / kind_of(atom.kind).mass
        atom.note = (f"{atom.note}; read at rows that carry no token but not added to the token rows "
                     f"(a position term of attention): a table's mass, {atom.mass:.3g}")
        diag.notes.append(f"position term: {name} is read at no token and not added to the token rows: "
                          f"mass {atom.mass:.3g}, not position_table_mass {mass:g}")


#: The mass of a table (an embedding's): what a position term the rules do not know reads as.
POSITION_TERM_MASS = 1.0

#: Ops past which a table's rows are no longer rows of the token stream: after a matrix
#: product or a normalisation they are features, not rows to be added to the tokens.
_ROW_BARRIERS = frozenset(MATRIX_OPS) | frozenset(NORMALISATIONS) | {"softmax", "embedding", "scaled_dot_product_attention"}
#: How many nodes the walks of `_added_to_token_rows` visit at most (embeddings are near).
_ROW_WALK = 64


def _added_to_token_rows(lookup: fx.Node, cap: Captured, scales: Scales) -> bool:
    """The rows `lookup` reads reach a sum whose other side holds the token rows (a table
    read at indices that depend on the model's input) with no matrix product or
    normalisation on either way: BERT's and GPT-2's `tok + pos`, a decoder's shifted labels'
    rows plus its positions. T5's relative-position bias meets the attention scores instead."""
    seen: set[fx.Node] = {lookup}
    frontier: list[tuple[fx.Node, fx.Node | None]] = [(lookup, None)]  # the use may be the sum itself
    while frontier and len(seen) < _ROW_WALK:
        here, came_from = frontier.pop()
        if ops.op_name(here, cap.modules) in SUMS and any(
                _token_rows_above(x, cap, scales) for _, x in ops.tensor_inputs(here) if x is not came_from):
            return True
        for user in here.users:
            if user not in seen and user in scales.live and ops.op_name(user, cap.modules) not in _ROW_BARRIERS:
                seen.add(user)
                frontier.append((user, here))
    return False


def _token_rows_above(node: fx.Node, cap: Captured, scales: Scales) -> bool:
    """A table read at indices that depend on the model's input lies above `node`, with no
    matrix product or normalisation between."""
    seen: set[fx.Node] = set()
    frontier = [node]
    while frontier and len(seen) < _ROW_WALK:
        x = frontier.pop()
        if x in seen:
            continue
        seen.add(x)
        op = ops.op_name(x, cap.modules)
        if op == "embedding":
            if any(i in scales.live and i not in scales.weights for _, i in ops.tensor_inputs(x)):
                return True
            continue
        if op in _ROW_BARRIERS or x.op in ("placeholder", "get_attr"):
            continue
        frontier += [i for _, i in ops.tensor_inputs(x)]
    return False


def _reads_no_input(node: fx.Node, scales: Scales) -> bool:
    """`node` computes on parameters and constants alone: no operand carries a model input."""
    return not any(r.op == "placeholder" for _, v in ops.tensor_inputs(node)
                   if v in scales.live and v not in scales.weights for r in scales.roots(v))


#: Ops a head's input may pass through between the normalisation and the head: casts and
#: views, and dropout (the identity at evaluation).
_HEAD_PASSTHROUGH = SCALE_PASSTHROUGH | {"dropout", "identity", "_to_copy"}


def _weigh_tied_head_norm(atoms: dict[str, Atom], uses: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]],
                          cap: Captured, scales: Scales, mass: float, diag: Diagnostics) -> None:
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
        atoms[g].mass = mass
        atoms[g].note = f"{atoms[g].note}; in front of the tied head {table}: mass {mass:g}"
    if found:
        diag.notes.append(f"tied head: {', '.join(found)} (in front of {', '.join(sorted(set(found.values())))}) "
                          f"take mass {mass:g}")


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


def plain_residuals(cap: Captured, scales: Scales) -> Residuals:
    """The walk of plain joins: the body that shares `BODY_MASS`, and each branch's nodes."""
    return _residuals(cap, scales, plain_only=True)


def _residuals(cap: Captured, scales: Scales, plain_only: bool) -> Residuals:
    """The residual branches of plain joins only (`x + f(x)`, the body that shares
    `BODY_MASS`), or of any sum, explicitly weighted ones included (modula's
    `(1 − 1/L)·x + f(x)/L`, whose masses are designed but whose matrices still grow)."""
    join = _plain_join(cap, scales) if plain_only else _any_join(cap, scales)
    return residuals(cap.graph, scales.live, join, lambda n: n not in scales.weights and not is_integer(n))


def _atoms_in(nodes: set[fx.Node], atoms: dict[str, Atom],
              uses: dict[str, list[tuple[AtomSpec, fx.Node, Use | None]]]) -> list[Atom]:
    """The atoms with a use among `nodes`, in `uses` order."""
    return [atoms[n] for n, specs in uses.items() if n in atoms and any(node in nodes for _, node, _ in specs)]


def _any_join(cap: Captured, scales: Scales) -> Callable[[fx.Node], bool]:
    """Sums of every kind, explicitly weighted ones included (modula's convex residuals);
    not a rotation `x·cos + R(x)·sin`, one activation turned."""
    return lambda node: ops.op_name(node, cap.modules) in SUMS and node not in scales.rotations


def _has_weighted_join(cap: Captured, scales: Scales) -> bool:
    """Whether some sum is explicitly weighted; without one, every join is plain and the walk
    of plain joins already is the walk of all of them."""
    every, plain = _any_join(cap, scales), _plain_join(cap, scales)
    return any(every(node) and not plain(node) for node in cap.graph.nodes)


def _plain_join(cap: Captured, scales: Scales) -> Callable[[fx.Node], bool]:
    """Plain sums (`x + f(x)`): no term is explicitly weighted, and not a rotation."""
    def join(node: fx.Node) -> bool:
        return ops.op_name(node, cap.modules) in SUMS and node not in scales.rotations and not any(
            scales.scaled_explicitly(i) for _, i in ops.tensor_inputs(node) if i in scales.live)
    return join


def cap_budgets(atoms: dict[str, Atom], cap: float, diag: Diagnostics) -> None:
    """No atom's budget above `cap` (`max_budget`), after the masses and budgets are set.

    A budget is the size of an atom's step at lr 1 in its own norm, where a well-normed
    weight has size 1. The budgets of the development families (GPT-2, Llama, BERT, ViT,
    ResNet) are at most 0.21 at the zoo's size. A reading that makes an atom's output look
    far less sensitive than it is inflates its budget past anything the default was
    validated on: Cohere's logits × 0.0625 made every downstream 1/16 of Llama's and its
    q, k and v budgets 3.5, a step larger than the weight itself at lr 1. The cap lowers
    such an atom's `budget_scale`, so that the budget stays derived from the mass (an
    annotations file recomputes it the same way), and leaves every other atom alone."""
    capped = []
    for atom in atoms.values():
        if atom.budget > cap:
            atom.budget_scale *= cap / atom.budget
            atom.budget = cap
            atom.note = f"{atom.note}; budget capped at max_budget {cap:g}"
            capped.append(atom.name)
    if capped:
        diag.notes.append(f"budgets capped at max_budget {cap:g}: {', '.join(capped[:4])}"
                          f"{' …' if len(capped) > 4 else ''} ({len(capped)} atoms)")
