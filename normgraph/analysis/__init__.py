"""Analysis: capture an fx graph (`trace`), name its ops (`ops`), read the rule tables
(`rules`, `scale`), read patterns by their math (`patterns`), and infer every parameter's
norm, mass, sensitivity and budget (`analyze`, then the default's steps in `default`, switched
by `AnalysisOptions`)."""
from .analyze import SENSITIVITY_MODES, analyze
from .options import AnalysisOptions
from .register import register_op
from .rules import register_atom_rule, register_bond_rule, register_module_rule
from .scale import register_scale_rule

__all__ = ["analyze", "AnalysisOptions", "SENSITIVITY_MODES", "register_op", "register_atom_rule", "register_bond_rule",
           "register_module_rule", "register_scale_rule"]
