"""The demo harness (`normgraph demo`): a small byte-level GPT, standard-library text, and a
side-by-side run of normgraph, AdamW and Muon+AdamW. An application of the package, not
one of its passes: nothing in the pipeline imports it."""
from .data import HELDOUT_FILES, TRAIN_FILES, Corpus, stdlib_dir
from .models import GPT, GPTConfig, loss_fn
from .run import (DEFAULT_LRS, OPTIMIZERS, SWEEP_LRS, MultiOptimizer, RunResult, evaluate, main,
                  make_optimizer, plot_curves, results_table, train)

__all__ = ["Corpus", "HELDOUT_FILES", "TRAIN_FILES", "stdlib_dir", "GPT", "GPTConfig", "loss_fn",
           "DEFAULT_LRS", "OPTIMIZERS", "SWEEP_LRS", "MultiOptimizer", "RunResult", "evaluate", "main",
           "make_optimizer", "plot_curves", "results_table", "train"]
