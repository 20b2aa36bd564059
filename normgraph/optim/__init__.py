"""The optimizer: a torch.optim.Optimizer around the generated map, over a functional core."""
from .functional import (all_finite, apply_updates, directions, momentum_directions, normgraph_step, row_confidences,
                         scale_rows, update_momenta)
from .optimizer import NormGraphOptimizer

__all__ = ["NormGraphOptimizer", "normgraph_step", "momentum_directions", "row_confidences", "scale_rows",
           "apply_updates", "all_finite", "update_momenta", "directions"]
