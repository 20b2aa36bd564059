"""Suite-wide settings.

The tests were written against fp32 orthogonalisation on the CPU (exact comparisons with
the SVD, bit-identical sharded maps, Gram-form selection). On a CPU with native bf16 the
default compute dtype is bf16 (`normgraph.codegen.orthogonalizers.cpu_has_fast_bf16`), so the
suite pins the fp32 default here; `tests/test_codegen.py` tests the bf16 default itself and
`tests/test_ns_bands.py` its accuracy.
"""
import os

os.environ.setdefault("NORMGRAPH_CPU_BF16", "0")
