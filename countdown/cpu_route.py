"""The CPU decode route: every dense ``nn.Linear`` of a decode step through the C++ GEMV.

On a CPU a decode step is bound by the bytes of its weights, and ``torch.mv`` / ``F.linear`` on a few
tokens read them at under half the machine's bandwidth (docs/MEASURED.md). `Route(model)` prepares, once,
a forward for each plain ``nn.Linear`` of the model (attention projections, dense MLPs, the LM head) that
sends 1 to `countdown.kernels.cpu.MAX_BATCH` tokens through the C++ GEMV (`countdown.kernels.cpu.linear`),
which streams each weight row once for all tokens; ``with route:`` installs them and removes them on exit.
Larger inputs (prefill), autograd, and weights the kernel does not take run ``F.linear`` as before.
The swap is an instance attribute ``forward`` on each module: parameters, ``state_dict`` and hooks are
untouched. The same forward objects are installed every time, so a ``torch.compile`` trace of the step
(`countdown.DecodeOptions.compile`) stays valid from one ``with`` to the next; inside the trace the GEMV
is the registered op ``torch.ops.countdown_cpu.linear``. Sparse modules (`countdown.ffn`,
`countdown.attention`) choose their own kernels (`kernel_skip_reason`), so a dense model and its
sparsified twin decode through the same route; input-sparse attention projections also send the
positions their policy keeps dense (Sirius's k+1-token verification forward, `countdown.agreement.dense`)
through the GEMV while routed. `countdown.Decoder` builds one and enters it around generation on a CPU model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


def _kernel_layout(weight: torch.Tensor) -> str | None:
    """How the GEMV reads ``weight`` [N, K]: "rows" (contiguous), "input_major" (a transposed view of
    contiguous [K, N] rows, the TEAL layout) or None (a dtype or layout it does not take: F.linear)."""
    if weight.dtype not in cpu.DTYPES or weight.dim() != 2 or weight.device.type != "cpu":
        return None
    if weight.is_contiguous():
        return "rows"
    return "input_major" if weight.t().is_contiguous() else None


def routed_forward(module: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``'s forward through the C++ GEMV for decode tokens, ``F.linear`` otherwise.

    Eagerly, the weight's layout is decided once per weight object and storage (a sparse module may lay
    its weight out anew: `countdown.ffn.use_input_major` gives it a new Parameter) and the extension's
    function is called directly; what is checked on each call is what can change between calls: the
    token count, the input's dtype and whether autograd records."""
    ext = cpu.extension()
    max_tokens = cpu.MAX_BATCH
    seen: list = [None, None, None]  # the weight last seen, its storage address, its layout

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, bias = module.weight, module.bias
        if torch.compiler.is_compiling():  # traced once: the checks become guards, the call the registered op
            layout = _kernel_layout(weight)
        else:
            if weight is not seen[0] or weight.data_ptr() != seen[1]:
                seen[:] = weight, weight.data_ptr(), _kernel_layout(weight)
            layout = seen[2]
        if (layout is None or x.dtype != weight.dtype or x.numel() > max_tokens * weight.shape[1]
                or x.shape[-1] != weight.shape[1] or torch.is_grad_enabled()):
            return F.linear(x, weight, bias)
        if torch.compiler.is_compiling():
            y = cpu.linear(x, weight)
        else:
            y = ext.linear(x, weight) if layout == "rows" else ext.linear_input_major(x, weight.t())
        return y if bias is None else y + bias

    return forward


def routed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through the C++ GEMV where it serves ``x`` (1 to
    `countdown.kernels.cpu.MAX_BATCH` tokens, the weight's dtype and a layout it reads, no autograd),
    else ``F.linear`` itself (for modules without a routed forward of their own)."""
    if (x.dtype == weight.dtype and x.numel() <= cpu.MAX_BATCH * weight.shape[1] and x.shape[-1] == weight.shape[1]
            and _kernel_layout(weight) is not None and not torch.is_grad_enabled()):
        y = cpu.linear(x, weight)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def linear_modules(model: nn.Module) -> list[nn.Linear]:
    """The plain ``nn.Linear`` modules of ``model`` (subclasses, e.g. input-sparse ones, route themselves)."""
    return [m for m in model.modules() if type(m) is nn.Linear]


class Route:
    """The routed forwards of ``model``'s plain linears, made once; ``with route:`` installs them (yields
    how many: 0 when `skip_reason` says why not, `reason`). Make a new one after changing the model's
    modules (`countdown.sparsify`)."""

    def __init__(self, model: nn.Module):
        self.reason = skip_reason(model)
        self.forwards = {} if self.reason is not None else {m: routed_forward(m) for m in linear_modules(model)}
        # input-sparse linears (`countdown.attention.SparseInputLinear`) route the positions their policy
        # keeps dense themselves, through `routed_linear`, while their flag is set
        self.flagged = [] if self.reason is not None else [
            m for m in model.modules() if isinstance(m, nn.Linear) and hasattr(type(m), DENSE_FLAG)]
        self._installed: list[nn.Linear] = []
        self._flagged: list[nn.Linear] = []

    def __enter__(self) -> int:
        self._installed = [m for m in self.forwards if ATTRIBUTE not in m.__dict__]
        for m in self._installed:
            m.forward = self.forwards[m]
        self._flagged = [m for m in self.flagged if DENSE_FLAG not in m.__dict__]
        for m in self._flagged:
            setattr(m, DENSE_FLAG, True)
        return len(self._installed)

    def __exit__(self, *exc) -> None:
        for m in self._installed:
            m.__dict__.pop(ATTRIBUTE, None)
        for m in self._flagged:
            m.__dict__.pop(DENSE_FLAG, None)
        self._installed, self._flagged = [], []


@contextmanager
def dense_linears(model: nn.Module) -> Iterator[int]:
    """Route the model's plain linears through the CPU GEMV while active (see the module docstring);
    yields how many were routed (0 when `skip_reason` says why not)."""
    with Route(model) as routed:
        yield routed
