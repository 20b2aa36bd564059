"""Analysis: capture an fx graph (`trace`), name its ops (`ops`), read the rule tables
(`rules`, `scale`), and infer every parameter's norm, mass, sensitivity and budget
(`analyze`)."""
from .analyze import SENSITIVITY_MODES, analyze
from .register import register_op
from .rules import register_atom_rule, register_bond_rule, register_module_rule
from .scale import register_scale_rule

__all__ = ["analyze", "SENSITIVITY_MODES", "register_op", "register_atom_rule", "register_bond_rule",
           "register_module_rule", "register_scale_rule"]
