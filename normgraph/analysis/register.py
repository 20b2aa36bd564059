"""Everything normgraph needs to know about one op, registered in one call.

An op's facts live in several tables because different passes read them (its spellings
in `ops.ALIASES` and `ops.NN_MODULE_OPS`, how a parameter flows through it in `rules.PARAM_FLOW`, what atom a
parameter it consumes is in `rules.ATOM_RULES`, its sensitivity in `rules.BOND_RULES`,
and its scale-mode rules in `scale.SCALE_RULES`/`SCALED_BOND_RULES`). `register_op` is
the one place a user (or a new built-in) writes them all.
"""
from __future__ import annotations

from collections.abc import Iterable

from . import ops
from .rules import PARAM_FLOW, AtomRule, BondRule, register_atom_rule, register_bond_rule
from .scale import ScaledBondRule, ScaleRule, register_scale_rule


def register_op(op: str, *, aliases: Iterable[str] = (), layers: Iterable[str] = (), param_flow: str | None = None,
                atom: AtomRule | None = None, bond: BondRule | None = None,
                scale: ScaleRule | None = None, scaled_bond: ScaledBondRule | None = None) -> None:
    """Teach normgraph the canonical op `op` (see docs/custom_rules.md).

    aliases      other names the tracer may record for it (e.g. "my_op_out")
    layers       parameter-free torch.nn layer classes (by name) that just call it, so an
                 opaque call of one (when torch.nn layers stay leaves) gets its rules
    param_flow   "passthrough" / "transpose" / "index" / "metadata": how a parameter flows
                 through it before its real consumer (omit for ops that consume parameters)
    atom         atom rule: `rule(use) -> AtomSpec | None` for parameters it consumes
    bond         its sensitivity to each input: a number or `rule(bond_input)`
    scale        scale mode: its output scale, `rule(node, args, S)`
    scaled_bond  scale mode: its sensitivity, `rule(bond_input, S)` (default: `bond`)
    """
    for alias in aliases:
        ops.ALIASES.register(alias, op)
    for layer in layers:
        ops.NN_MODULE_OPS.register(layer, op)
    if param_flow is not None:
        PARAM_FLOW.register(op, param_flow)
    if atom is not None:
        register_atom_rule(op, atom)
    if bond is not None:
        register_bond_rule(op, bond)
    if scale is not None or scaled_bond is not None:
        register_scale_rule(op, scale=scale, bond=scaled_bond)
