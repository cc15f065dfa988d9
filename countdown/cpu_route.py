"""The CPU decode route: every dense ``nn.Linear`` of a decode step through the C++ GEMV.

On a CPU a decode step is bound by the bytes of its weights, and ``torch.mv`` / ``F.linear`` on a few
tokens read them at under half the machine's bandwidth (docs/MEASURED.md). `dense_linears(model)` is a
context manager that, while it is active, sends each plain ``nn.Linear`` of the model (attention
projections, dense MLPs, the LM head) that is called with 1 to `countdown.kernels.cpu.MAX_BATCH` tokens
through `countdown.kernels.cpu.linear`, which streams each weight row once for all tokens. Larger
inputs (prefill), autograd, and weights the kernel does not take run ``F.linear`` as before.
The swap is an instance attribute ``forward`` on each module, removed on exit: parameters,
``state_dict`` and hooks are untouched. Sparse modules (`countdown.ffn`, `countdown.attention`) choose
their own kernels (`kernel_skip_reason`), so a dense model and its sparsified twin decode through the
same route; input-sparse attention projections also send the positions their policy keeps dense
(Sirius's k+1-token verification forward, `countdown.agreement.dense`) through the GEMV while routed. `countdown.Decoder` enters it around generation on a CPU model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import cpu

ATTRIBUTE = "forward"
DENSE_FLAG = "cpu_dense_route"  # a class attribute (False) of linears that route their dense positions


def skip_reason(model: nn.Module) -> str | None:
    """None when the route applies to ``model`` (on the CPU, extension built), else why not."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return "the model has no parameters"
    if device.type != "cpu":
        return f"the model is on {device.type}"
    return cpu.extension_reason()


def routed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through the C++ GEMV where it serves ``x`` (1 to
    `countdown.kernels.cpu.MAX_BATCH` tokens, the weight's dtype and a layout it reads, no autograd),
    else ``F.linear`` itself."""
    if (x.dtype == weight.dtype and x.numel() <= cpu.MAX_BATCH * weight.shape[1] and x.shape[-1] == weight.shape[1]
            and weight.dtype in cpu.DTYPES and not torch.is_grad_enabled()
            and (weight.is_contiguous() or weight.t().is_contiguous())):
        y = cpu.linear(x, weight)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def _routed_forward(module: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return routed_linear(x, module.weight, module.bias)  # read per call: a sparse module may lay it out anew

    return forward


def linear_modules(model: nn.Module) -> list[nn.Linear]:
    """The plain ``nn.Linear`` modules of ``model`` (subclasses, e.g. input-sparse ones, route themselves)."""
    return [m for m in model.modules() if type(m) is nn.Linear]


@contextmanager
def dense_linears(model: nn.Module) -> Iterator[int]:
    """Route the model's plain linears through the CPU GEMV while active (see the module docstring);
    yields how many were routed (0 when `skip_reason` says why not)."""
    if skip_reason(model) is not None:
        yield 0
        return
    modules = [m for m in linear_modules(model) if ATTRIBUTE not in m.__dict__]
    # input-sparse linears (`countdown.attention.SparseInputLinear`) run the positions their policy keeps
    # dense (Sirius's verification forward, a dense reference) through the GEMV too, while routed
    subclassed = [m for m in model.modules() if isinstance(m, nn.Linear) and hasattr(type(m), DENSE_FLAG)
                  and DENSE_FLAG not in m.__dict__]
    for m in modules:
        m.forward = _routed_forward(m)
    for m in subclassed:
        setattr(m, DENSE_FLAG, True)
    try:
        yield len(modules)
    finally:
        for m in modules:
            m.__dict__.pop(ATTRIBUTE, None)
        for m in subclassed:
            m.__dict__.pop(DENSE_FLAG, None)
