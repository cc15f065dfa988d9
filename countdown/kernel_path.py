"""The fast path of a sparse gated FFN: one Triton kernel per decode token instead of the reference.

`SparseFFN` asks `kernel_skip_reason` on every call; when it says None the FFN runs through
`run_kernel`, which computes exactly what the method's reference `forward` computes (same score, same
threshold, same mask) while reading only the kept rows of the sparse matrices. Otherwise, or when
kernels are switched off, the reference path runs: it is always correct, only slower.

The kernels want W_down transposed ([I, H], a kept neuron is one contiguous row). That copy is made
once per FFN on first use and kept as a non-persistent buffer (it is 1/3 of the FFN's weight memory;
``set_kernels(model, "off")`` frees it). Weights edited in place after that are not seen by the copy:
call ``set_kernels(model, "auto")`` again to refresh it.
"""

from __future__ import annotations

import torch
from torch import nn

# which kernel runs which method; the methods not listed (TEAL, dense) always use the reference path
KERNEL_METHODS = ("cats", "m-countdown", "d-countdown-ideal", "d-countdown")
KERNEL_MODES = ("auto", "off", "always")

# activation names used by transformers configs -> the kernels' names
_KERNEL_ACTS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


def kernel_activation(act_name: str) -> str | None:
    return _KERNEL_ACTS.get(act_name)


def kernel_skip_reason(module, x: torch.Tensor) -> str | None:
    """None when ``module`` (a SparseFFN) can run this input through a kernel, else why not.

    ``module.kernels``: "auto" uses the kernels on CUDA only; "always" also where the Triton
    interpreter runs them (TRITON_INTERPRET=1 on CPU, for tests); "off" never."""
    from . import kernels

    if module.kernels == "off":
        return "kernels are switched off"
    if module.method.name not in KERNEL_METHODS:
        return f"method {module.method.name!r} has no kernel"
    if module.masker.mode != "threshold":
        return f"mode {module.masker.mode!r}: the kernels apply calibrated thresholds only"
    if module.masker.track:
        return "measured-sparsity tracking is on (evaluation counts every mask on the reference path)"
    if kernel_activation(module.act_name) is None:
        return f"activation {module.act_name!r} has no kernel"
    if module.has_bias():
        return "the FFN's projections have biases, which the kernels do not add"
    if module.kernels == "auto" and x.device.type != "cuda":
        return f"input is on {x.device.type}; kernels='auto' uses them on CUDA only"
    w_down = module.down_proj.weight
    return kernels.kernel_unavailable_reason(x, w_down.t())


def down_transposed(module) -> torch.Tensor:
    """W_down as [I, H] contiguous, made once and refreshed if the weight moved or changed dtype."""
    w = module.down_proj.weight
    cached = getattr(module, "w_down_t", None)
    if cached is None or cached.device != w.device or cached.dtype != w.dtype:
        module.register_buffer("w_down_t", w.detach().t().contiguous(), persistent=False)
    return module.w_down_t


def run_kernel(module, x: torch.Tensor) -> torch.Tensor:
    """The FFN output for one decode token x ([1, 1, H] or [1, H]) through the method's kernel."""
    from . import kernels

    w_gate, w_up = module.gate_weight(), module.up_weight()
    w_down_t = down_transposed(module)
    thr = module.masker.threshold("coef").reshape(1)
    if thr.device != x.device:
        thr = thr.to(x.device)
    act = kernel_activation(module.act_name)
    name = module.method.name
    if name == "cats":
        return kernels.fused_gather_ffn(x, w_gate, w_up, w_down_t, thr, act=act, dense="gate")
    if name == "m-countdown":
        return kernels.fused_gather_ffn(x, w_up, w_gate, w_down_t, thr, act=act, dense="up")
    if name == "d-countdown-ideal":
        return kernels.coefficient_ffn(x, w_gate, w_up, w_down_t, thr, act=act)
    if name == "d-countdown":
        score = module.predict(x)
        return kernels.predicted_sparse_ffn(x, score, w_gate, w_up, w_down_t, thr, act=act)
    raise AssertionError(f"no kernel for {name}")  # kernel_skip_reason rules this out


def set_kernels(model: nn.Module, mode: str = "auto") -> int:
    """Choose the FFN path of every installed sparse FFN: "auto" (Triton kernels for single-token
    decode on CUDA, reference elsewhere), "off" (always the reference path) or "always" (kernels
    wherever Triton can run them, the CPU interpreter included). Returns how many FFNs were set."""
    from .ffn import SparseFFN, sparse_modules

    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {KERNEL_MODES}, got {mode!r}")
    modules = [m for m in sparse_modules(model) if isinstance(m, SparseFFN)]
    for m in modules:
        m.kernels = mode
        if hasattr(m, "w_down_t"):
            del m.w_down_t  # dropped when off; rebuilt from the current weight otherwise
        on_gpu = m.down_proj.weight.device.type == "cuda"
        if m.method.name in KERNEL_METHODS and (mode == "always" or (mode == "auto" and on_gpu)):
            down_transposed(m)  # now, not inside a CUDA-graph capture or a torch.compile trace
    return len(modules)
