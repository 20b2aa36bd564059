"""The baselines normgraph is compared with: AdamW, and Muon on the hidden matrices + AdamW.

`torch.optim.Muon` always runs its Newton–Schulz iteration in bfloat16. A CPU without
native bf16 (AVX2-only x86, most laptops) emulates bf16 products at ~10× the fp32 time, so
on such a machine a timing or even a run against Muon measures the emulation, not the
method. `muon_dtype()` picks the dtype the machine is fast in, by the same rule normgraph's
own map uses (`normgraph.codegen.orthogonalizers.cpu_has_fast_bf16`, overridable with
``NORMGRAPH_CPU_BF16=0/1``), and `Muon` runs torch's algorithm in it: same coefficients,
steps, momentum, Nesterov and lr adjustment; only the iteration's dtype is chosen.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.optim._muon as _torch_muon

from ..codegen.orthogonalizers import cpu_has_fast_bf16


def muon_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16 on CUDA and on CPUs with native bf16 (as torch.optim.Muon assumes), else float32."""
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return torch.float32


def _newton_schulz(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                   eps: float, dtype: torch.dtype) -> torch.Tensor:
    """torch.optim.Muon's quintic iteration (the same arithmetic) in `dtype`."""
    if grad.ndim != 2:
        raise ValueError("Muon's Newton–Schulz takes a 2-D gradient")
    a, b, c = ns_coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


@contextlib.contextmanager
def _iteration_in(dtype: torch.dtype) -> Iterator[None]:
    """Run torch.optim.Muon's step with its Newton–Schulz in `dtype` (bf16: torch's own)."""
    if dtype == torch.bfloat16:
        yield
        return
    original = getattr(_torch_muon, "_zeropower_via_newtonschulz", None)
    if original is None:  # a torch whose Muon is laid out differently: say so, never run silently in bf16
        raise RuntimeError("this torch's torch.optim.Muon has no _zeropower_via_newtonschulz to run in "
                           f"{dtype}; run with NORMGRAPH_CPU_BF16=1 to keep torch's bf16 iteration")
    _torch_muon._zeropower_via_newtonschulz = (
        lambda g, coeffs, steps, eps: _newton_schulz(g, coeffs, steps, eps, dtype).to(torch.bfloat16))
    try:
        yield
    finally:
        _torch_muon._zeropower_via_newtonschulz = original


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` with its Newton–Schulz iteration in `ns_dtype` (default: `muon_dtype()`
    of the parameters' device). In bfloat16 it is torch's optimizer unchanged. In float32 the
    result is rounded to bfloat16 before the update, as torch's own iteration returns it."""

    def __init__(self, params: Iterable[torch.Tensor], *args, ns_dtype: torch.dtype | None = None, **kwargs) -> None:
        params = list(params)
        super().__init__(params, *args, **kwargs)
        self.ns_dtype = ns_dtype or muon_dtype(params[0].device if params else "cpu")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        with _iteration_in(self.ns_dtype):
            return super().step(closure)


class MultiOptimizer:
    """Steps several optimizers as one (Muon for hidden matrices + AdamW for the rest)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts
        self.param_groups = [g for o in opts for g in o.param_groups]

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    @property
    def ns_dtype(self) -> torch.dtype | None:
        return next((o.ns_dtype for o in self.opts if isinstance(o, Muon)), None)


class _FlatKernels(torch.optim.Optimizer):
    """Muon on conv kernels through a 2-D view (C_out × C_in·k…), as Muon's users flatten them:
    torch.optim.Muon takes 2-D parameters only."""

    def __init__(self, kernels: list[torch.nn.Parameter], **muon_kwargs) -> None:
        self.kernels = kernels
        self.flat = [torch.nn.Parameter(k.detach().reshape(k.shape[0], -1).clone()) for k in kernels]
        self.muon = Muon(self.flat, **muon_kwargs)
        self.ns_dtype = self.muon.ns_dtype
        self.param_groups = self.muon.param_groups
        self.defaults = self.muon.defaults
        self.state = self.muon.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for k in self.kernels:
            k.grad = None

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for k, f in zip(self.kernels, self.flat):
            f.copy_(k.reshape_as(f))
            f.grad = None if k.grad is None else k.grad.reshape_as(f)
        self.muon.step()
        for k, f in zip(self.kernels, self.flat):
            k.copy_(f.reshape_as(k))


def adamw(params: Iterable[torch.Tensor], lr: float) -> torch.optim.AdamW:
    """The AdamW every comparison uses: betas (0.9, 0.95), no weight decay."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def muon_adamw(model: torch.nn.Module, hidden: Iterable[torch.Tensor], lr: float, adam_lr: float,
               momentum: float = 0.95, ns_dtype: torch.dtype | None = None) -> MultiOptimizer:
    """Muon (momentum `momentum`, Nesterov, no decay) on `hidden` (2-D matrices directly, conv
    kernels through a flattened view) and AdamW at `adam_lr` on every other parameter."""
    hidden = list(hidden)
    ids = {id(p) for p in hidden}
    mats = [p for p in hidden if p.ndim == 2]
    kernels = [p for p in hidden if p.ndim > 2]
    rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    kw = dict(lr=lr, weight_decay=0.0, momentum=momentum, nesterov=True, ns_dtype=ns_dtype)
    opts: list[torch.optim.Optimizer] = []
    if mats:
        opts.append(Muon(mats, **kw))
    if kernels:
        opts.append(_FlatKernels(kernels, **kw))
    if rest:
        opts.append(adamw(rest, adam_lr))
    return MultiOptimizer(*opts)
