"""Decode kernels for sparse gated FFNs (Triton), with pure-torch references.

The ops read W_gate, W_up [I, H] (nn.Linear's layout) and W_down transposed, ``w_down_t`` [I, H], all
contiguous, so a skipped neuron is a skipped row (`countdown.ffn.use_input_major` lays a sparse FFN's
W_down out so when `countdown.set_kernels` runs). ``gather_ffn`` and ``sparse_down`` (a given vector)
serve no method: they stay as kernel-alone baselines of the fused ops.

    op                                                       method           reads
    sparse_down(t, w_down_t, thr)                            D-COUNTDOWN ideal down rows of |t|>thr
    coefficient_ffn(x, w_gate, w_up, w_down_t, thr, act=)    D-COUNTDOWN ideal gate, up; kept down rows
    gather_ffn(x, a, w_sparse, w_down_t, thr, act=, dense=)  CATS / M-COUNTDOWN kept rows of 2 matrices
    fused_gather_ffn(x, w_dense, w_sparse, w_down_t, thr, act=, dense=)
                                                             CATS / M-COUNTDOWN dense one, kept rows 2
                                                             DejaVu (signed), CHESS (thr vector)
    coefficient_ffn with an [I] threshold vector             S-COUNTDOWN      gate, up; kept down rows
    predicted_sparse_ffn(x, score, w_gate, w_up, w_down_t, thr, act=)
                                                             D-COUNTDOWN prac. kept rows of all 3
    input_sparse_linear(x, w_t, thr, channel_scale=)         TEAL / WINA      rows of kept input channels
    input_sparse_linears(x, [w_gate_t, w_up_t], thr, ...)    TEAL / WINA      the same, one launch (B = 1)
    decode_attention(q, k, v, mask, scale)                   decode attention one token's grouped heads
                                                                              over the filled KV cache

Every FFN op takes ``thr`` as a float, a 1-element tensor, or an [I] float32 tensor of per-neuron
thresholds (CHESS: τ / E|u_i|; S-COUNTDOWN: sqrt(2τ) / ‖W_down[:, i]‖); the gather ops also take
``signed=True`` (keep a_i > thr on the signed score: DejaVu). ``input_sparse_linear`` (TEAL, WINA)
scales its scores per channel instead (``channel_scale``).

Every FFN and input-sparse op takes ``policy=`` (a `countdown.KernelPolicy`; default KernelPolicy()): the variant
(``input_sparse``, ``fuse_gate_up``, ``compact_max_batch``) and programmatic dependent launch (``pdl``).

The ops serve decode batches of 1 to 16 tokens (x [H], [B, H] or [B, 1, H]; vectors [B, I]): one
token runs the batch-1 kernel (``_core``), 2 to 16 tokens the batched kernels (``batch_ffn``), where
each token keeps its own neurons and the rows of the batch's union are read once.
``countdown.kernels.reference`` has the same functions in pure torch (any device, any batch), and
``countdown.kernels.cpu`` the same ops for CPU tensors (a C++ extension built on first use; its
``unavailable_reason`` says when it does not serve). `uses_cpu_kernels(mode, device)` says which of the
two kernel families a kernels mode picks on a device.
A caller picks the path with ``kernel_unavailable_reason(x, w_down_t)``: None means the Triton
kernels apply (CUDA tensors, decode batch of at most 16, supported dtype/shape, Triton installed);
otherwise the string says why (e.g. "prefill", "batch B = 32 > 16"), and the reference function
must be used.
"""

from __future__ import annotations

import torch

from ..options import KernelPolicy
from . import cpu, reference
from .pack import HAS_TRITON, MAX_BATCH, MAX_HIDDEN, interpret_mode, kernel_unavailable_reason

if HAS_TRITON:
    from .gqa_attention import decode_attention, decode_attention_unavailable_reason
    from .gather_ffn import fused_gather_ffn, gather_ffn
    from .input_sparse import input_sparse_linear, input_sparse_linears, input_sparse_unavailable_reason
    from .predicted_ffn import predicted_sparse_ffn
    from .sparse_down import coefficient_ffn, sparse_down
else:
    def _no_triton(*args, **kwargs):
        raise RuntimeError("Triton is not installed (pip install 'countdown-llm[gpu]'); "
                           "use countdown.kernels.reference instead")

    sparse_down = coefficient_ffn = gather_ffn = fused_gather_ffn = predicted_sparse_ffn = _no_triton
    input_sparse_linear = input_sparse_linears = decode_attention = _no_triton

    def input_sparse_unavailable_reason(*args, **kwargs) -> str:
        return "Triton is not installed"

    decode_attention_unavailable_reason = input_sparse_unavailable_reason


def uses_cpu_kernels(policy: KernelPolicy | str, device: torch.device) -> bool:
    """Whether a kernel policy (or its mode string) serves tensors on ``device`` with the C++ CPU ops
    (`cpu`): on a CPU under "auto", and under "always" where Triton (whose interpreter runs the Triton
    ops on a CPU, for their tests) is not installed."""
    mode = KernelPolicy.of(policy).mode
    return device.type == "cpu" and (mode == "auto" or (mode == "always" and not HAS_TRITON))


__all__ = [
    "HAS_TRITON",
    "MAX_BATCH",
    "MAX_HIDDEN",
    "coefficient_ffn",
    "cpu",
    "decode_attention",
    "decode_attention_unavailable_reason",
    "fused_gather_ffn",
    "gather_ffn",
    "input_sparse_linear",
    "input_sparse_linears",
    "input_sparse_unavailable_reason",
    "interpret_mode",
    "kernel_unavailable_reason",
    "predicted_sparse_ffn",
    "reference",
    "sparse_down",
    "uses_cpu_kernels",
]
