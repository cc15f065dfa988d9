"""Batch-1 decode kernels for sparse gated FFNs (Triton), with pure-torch references.

Weights are laid out once by ``pack_ffn_weights(w_gate, w_up, w_down)``: W_gate, W_up [I, H] and
W_down transposed to ``w_down_t`` [I, H], all contiguous, so a skipped neuron is a skipped row.

    op                                                       method           reads
    sparse_down(t, w_down_t, thr)                            D-COUNTDOWN ideal down rows of |t|>thr
    coefficient_ffn(x, w_gate, w_up, w_down_t, thr, act=)    D-COUNTDOWN ideal gate, up; kept down rows
    gather_ffn(x, a, w_sparse, w_down_t, thr, act=, dense=)  CATS / M-COUNTDOWN kept rows of 2 matrices
    fused_gather_ffn(x, w_dense, w_sparse, w_down_t, thr, act=, dense=)
                                                             CATS / M-COUNTDOWN dense one, kept rows 2
    predicted_sparse_ffn(x, score, w_gate, w_up, w_down_t, thr, act=)
                                                             D-COUNTDOWN prac. kept rows of all 3

``countdown.kernels.reference`` has the same functions in pure torch (any device, any batch).
A caller picks the path with ``kernel_unavailable_reason(x, w_down_t)``: None means the Triton
kernel applies (CUDA tensor, one token, supported dtype/shape, Triton installed); otherwise the
string says why, and the reference function must be used.
"""

from __future__ import annotations

import torch

from . import reference
from .pack import SUPPORTED_DTYPES, PackedFFN, pack_ffn_weights

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the reference path still works
    HAS_TRITON = False

if HAS_TRITON:
    from ._core import MAX_HIDDEN, interpret_mode
    from .gather_ffn import fused_gather_ffn, gather_ffn
    from .predicted_ffn import predicted_sparse_ffn
    from .sparse_down import coefficient_ffn, sparse_down
else:
    MAX_HIDDEN = 16384

    def interpret_mode() -> bool:
        return False

    def _no_triton(*args, **kwargs):
        raise RuntimeError("Triton is not installed (pip install 'countdown-llm[gpu]'); "
                           "use countdown.kernels.reference instead")

    sparse_down = coefficient_ffn = gather_ffn = fused_gather_ffn = predicted_sparse_ffn = _no_triton


def kernel_unavailable_reason(x: torch.Tensor, w_down_t: torch.Tensor) -> str | None:
    """None when the Triton kernels can run on this token and these weights, else the reason."""
    if not HAS_TRITON:
        return "Triton is not installed"
    if x.device.type != "cuda" and not interpret_mode():
        return f"tensors are on {x.device.type}, the kernels need CUDA"
    hidden = w_down_t.shape[-1]
    if x.numel() != hidden:
        return f"input holds {x.numel() // max(hidden, 1)} tokens; the kernels are for one decode token"
    if x.dtype not in SUPPORTED_DTYPES or w_down_t.dtype != x.dtype:
        return f"dtype {x.dtype} / weights {w_down_t.dtype} not supported (bf16, fp16, fp32, matching)"
    if hidden > MAX_HIDDEN:
        return f"hidden size {hidden} > {MAX_HIDDEN}"
    if w_down_t.numel() >= 2**31:
        return "weights too large for int32 indexing"
    return None


__all__ = [
    "HAS_TRITON",
    "PackedFFN",
    "coefficient_ffn",
    "fused_gather_ffn",
    "gather_ffn",
    "kernel_unavailable_reason",
    "pack_ffn_weights",
    "predicted_sparse_ffn",
    "reference",
    "sparse_down",
]
