"""`AnalysisOptions`: the switches of the default's steps, in one object.

`normgraph.analyze` takes what a user decides about a model (inputs, masses, kinds, the
sensitivity mode, the tracer's front end); everything else that shapes the budgets is one
of these switches. Each names one step of the default (`normgraph.analysis.default`), so a
step can be turned off, measured without, or set to another value:

    normgraph.analyze(model, x, options=AnalysisOptions(body_decay=0.05))
    normgraph.analyze(model, x, body_decay=0.05)          # the same, as a shorthand

Defaults are the measured default (docs/concepts.md §5 says what decided each).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

#: Total mass of the residual body in "hybrid" mode (modula's `blocks_mass`).
BODY_MASS = 8.0
#: Reference size of a residual body, in mass-weighted atoms: budgets × √(n_eff / n_ref).
BODY_REFERENCE_ATOMS = 28.0
#: Decoupled weight decay of the matrices inside plain residual branches (0: none).
BODY_DECAY = 0.0
#: Decay of the matrices inside explicitly weighted residual branches (modula's convex ones).
WEIGHTED_BRANCH_DECAY = 0.05
#: Decay of a matrix outside the body that reads the unnormalised residual stream.
STREAM_READER_DECAY = 0.05
#: Mass of a table read at rows that carry no token (positions), beside a body.
POSITION_TABLE_MASS = 0.01
#: Mass of each gain and bias in front of a tied head, beside a body.
TIED_HEAD_NORM_MASS = 0.3
#: Largest budget the default gives an atom (None: no cap).
MAX_BUDGET: float | None = 0.5
BODY_PROFILES = ("flat", "measured")
CONV_MODES = ("positional", "flatten")


@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
    """The switches of the default's steps (docs/api.md lists each with its measurement).

    conv_mode           "positional" (a conv kernel as K matrices, the paper's rule) or "flatten"
    split_packed        orthogonalize each part of a packed projection on its own
    attention_patterns  attention written out op by op reads as SDPA (`patterns.attention_reads`)
    fused_projections   a matrix read in k parts weighs k matrices (`patterns.output_parts`)
    table_multipliers   a constant multiplier on a table's rows belongs to the table
    branch_fanout       an activation read inside several residual branches (a parallel
                        block's one norm, an encoder's output read by each decoder block)
                        adds its uses within a branch and sums the branches in quadrature
    stems               a conv reading the raw input moves entrywise (sign dual, a gain's mass)
    channel_convs       a conv read only by a BatchNorm moves per output channel
    body_mass           total mass of the atoms in plain residual branches ("auto": 8 in
                        "hybrid" mode, none otherwise; None: one unit per atom)
    body_reference      n_ref of the body read in quadrature ("auto": 28; None: off)
    body_profile        "flat" (every branch at the body's common downstream) or "measured"
    position_table_mass mass of a table read at rows that carry no token, beside a body
    position_terms      only a table whose rows are added to the token rows takes
                        position_table_mass; a position term of attention keeps a table's
                        (False: every table read at no token takes it, as before the zoo)
    tied_head_norm_mass mass of the gains and biases in front of a tied head, beside a body
    max_budget          largest budget an atom gets in "hybrid" mode (None: no cap)
    body_decay          weight decay of the matrices in plain residual branches
    weighted_branch_decay  of the matrices in explicitly weighted residual branches
    stream_reader_decay    of a matrix outside the body that reads the unnormalised stream
    """

    conv_mode: str = "positional"
    split_packed: bool = True
    attention_patterns: bool = True
    fused_projections: bool = True
    table_multipliers: bool = True
    branch_fanout: bool = True
    stems: bool = True
    channel_convs: bool = True
    body_mass: float | str | None = "auto"
    body_reference: float | str | None = "auto"
    body_profile: str = "flat"
    position_table_mass: float = POSITION_TABLE_MASS
    position_terms: bool = True
    tied_head_norm_mass: float = TIED_HEAD_NORM_MASS
    max_budget: float | None = MAX_BUDGET
    body_decay: float | str = "auto"
    weighted_branch_decay: float = WEIGHTED_BRANCH_DECAY
    stream_reader_decay: float = STREAM_READER_DECAY

    def __post_init__(self) -> None:
        if self.conv_mode not in CONV_MODES:
            raise ValueError(f"conv_mode={self.conv_mode!r}: expected one of {CONV_MODES}")
        if self.body_profile not in BODY_PROFILES:
            raise ValueError(f"body_profile={self.body_profile!r}: expected one of {BODY_PROFILES}")
        for name in ("split_packed", "attention_patterns", "fused_projections", "table_multipliers",
                     "branch_fanout", "stems", "channel_convs", "position_terms"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected True or False")
        for name in ("body_mass", "body_reference"):
            v = getattr(self, name)
            if not (v in ("auto", None) or _positive(v)):
                raise ValueError(f"{name}={v!r}: expected 'auto', None or a positive number")
        if not (self.body_decay == "auto" or _non_negative(self.body_decay)):
            raise ValueError(f"body_decay={self.body_decay!r}: expected 'auto' or a finite number >= 0 (the "
                             "weight decay compile(weight_decay='auto') gives the matrices in residual branches)")
        for name in ("position_table_mass", "tied_head_norm_mass"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive number")
        if not (self.max_budget is None or _positive(self.max_budget)):
            raise ValueError(f"max_budget={self.max_budget!r}: expected None or a positive number")
        for name in ("weighted_branch_decay", "stream_reader_decay"):
            if not _non_negative(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a finite number >= 0")

    def replace(self, **changes: Any) -> "AnalysisOptions":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown analysis option(s) {', '.join(unknown)}; the options are "
                            f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def resolved_body_mass(self, sensitivity: str) -> float | None:
        if self.body_mass == "auto":
            return BODY_MASS if sensitivity == "hybrid" else None
        if self.body_mass is not None and sensitivity == "modula":
            raise ValueError("body_mass needs a scale-reading sensitivity mode (\"hybrid\", \"scale\", "
                             "\"typical\"); sensitivity=\"modula\" keeps modula's masses exactly")
        return None if self.body_mass is None else float(self.body_mass)

    def resolved_body_reference(self) -> float | None:
        return BODY_REFERENCE_ATOMS if self.body_reference == "auto" else (
            None if self.body_reference is None else float(self.body_reference))

    def resolved_body_decay(self) -> float:
        return BODY_DECAY if self.body_decay == "auto" else float(self.body_decay)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _non_negative(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
