"""The generated map at run time: compiled with torch.compile when that works, else eager."""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

COMPILE_MODES = ("default", "eager", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _describe(err: BaseException) -> str:
    """One line naming the compiler error (and the backend's own error it wraps, if any)."""
    root = getattr(err, "inner_exception", None) or err.__cause__
    text = f"{type(err).__name__}: {err}"
    if root is not None and root is not err:
        text = f"{type(err).__name__} ← {type(root).__name__}: {root}"
    return " ".join(text.split())[:400]


class DualityMap:
    """The generated function, compiled with torch.compile when that works.

    `compile_mode="eager"` (or `backend=None`) never compiles. Otherwise the first call
    compiles; if compilation fails the map warns once, naming the error, and runs eagerly
    from then on (same results, slower).
    """

    def __init__(self, eager: Callable, source: str, compile_mode: str = "default",
                 backend: str | None = "inductor") -> None:
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile_mode {compile_mode!r}; use one of {COMPILE_MODES}")
        self.eager = eager
        self.source = source
        self.compile_mode = compile_mode if backend is not None else "eager"
        self.compile_error: str | None = None
        self._compiled: Callable | None = None
        if self.compile_mode != "eager":
            mode = None if compile_mode == "default" else compile_mode
            self._compiled = torch.compile(eager, backend=backend, mode=mode, dynamic=False)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    #: `__call__` takes `out=`: the updates are written into those tensors (`optim.functional`
    #: passes the gradients, so that the step allocates no update tensors).
    writes_out = True

    def __call__(self, grads: list[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        args = (grads,) if out is None else (grads, out)
        if self._compiled is not None:
            try:
                return self._compiled(*args)
            except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
                self.compile_error = _describe(err)
                self._compiled = None
                warnings.warn(f"normgraph: torch.compile of the duality map failed ({self.compile_error}); "
                              "running it eagerly instead. Pass compile_mode='eager' to skip compiling.",
                              RuntimeWarning, stacklevel=2)
        return self.eager(*args)

    def __repr__(self) -> str:
        return f"DualityMap(compiled={self.compiled}, mode={self.compile_mode!r})"


