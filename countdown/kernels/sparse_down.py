"""D-COUNTDOWN (ideal): the down projection over the neurons whose coefficient passes the threshold.

    sparse_down(t, w_down_t, thr)        y = sum_{i: |t_i| > thr_i} t_i * w_down_t[i, :]
    coefficient_ffn(x, w_gate, w_up, w_down_t, thr, act)
                                         the same with t = act(W_gate x) * (W_up x) computed densely
                                         inside the same kernel (one launch for the whole FFN)

Shapes (H hidden, I intermediate): t [I] / [B, I] / [B, 1, I] with B <= 16 tokens (any float dtype;
B >= 2 runs ``batch_ffn``: each token keeps its own neurons, the union's rows are read once), x [H]
(same leading shape), w_gate / w_up / w_down_t [I, H] contiguous in the weights' dtype (bf16, fp16,
fp32; w_down_t is W_down transposed). threshold: Python float or 1-element float tensor on the device
(a tensor lets one CUDA graph serve every threshold value), or an [I] contiguous float32 tensor of
per-neuron thresholds shared by the tokens (S-COUNTDOWN: ½ t_i² n_i² > τ is |t_i| > sqrt(2τ) / n_i). Output: [..., H] in the weights'
dtype; accumulation is fp32. Rows of w_down_t whose neuron fails the test are never read.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _core, _runtime, batch_ffn
from ..options import KernelPolicy
from .pack import (check_down, check_gated_call, check_threshold, check_vector, check_weight,
                   decode_batch, require_kernel)


__all__ = ["sparse_down", "coefficient_ffn"]


def _sparse_down_impl(t: torch.Tensor, w_down_t: torch.Tensor, threshold: Optional[torch.Tensor],
                      threshold_value: float, pdl: bool = True) -> torch.Tensor:
    return _core.launch(_core.KIND_T, False, w_down_t, t, None, None, w_down_t, threshold, threshold_value,
                        "silu", False, w_down_t.dtype, pdl=pdl)


_sparse_down_op = torch.library.custom_op("countdown::sparse_down", _sparse_down_impl, mutates_args=())


@_sparse_down_op.register_fake
def _(t, w_down_t, threshold, threshold_value, pdl=True):
    return w_down_t.new_empty(w_down_t.shape[1])


def _coefficient_ffn_impl(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                          threshold: Optional[torch.Tensor], threshold_value: float, act: str,
                          pdl: bool = True) -> torch.Tensor:
    return _core.launch(_core.KIND_T, True, x, None, w_gate, w_up, w_down_t, threshold, threshold_value,
                        act, False, x.dtype, pdl=pdl)


_coefficient_ffn_op = torch.library.custom_op("countdown::coefficient_ffn", _coefficient_ffn_impl,
                                              mutates_args=())


@_coefficient_ffn_op.register_fake
def _(x, w_gate, w_up, w_down_t, threshold, threshold_value, act, pdl=True):
    return x.new_empty(w_down_t.shape[1])


def sparse_down(t: torch.Tensor, w_down_t: torch.Tensor, threshold: float | torch.Tensor, *,
                policy: KernelPolicy | str | None = None) -> torch.Tensor:
    """y = sum over i with |t_i| > threshold of t_i * w_down_t[i, :]; y has t's leading shape + [H].
    policy (`countdown.KernelPolicy`): its ``pdl`` (batch 1) and ``compact_max_batch`` (batch 2-16)."""
    policy = KernelPolicy.of(policy)
    inter, hidden = check_down(w_down_t)
    if w_down_t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"w_down_t has dtype {w_down_t.dtype}; supported: bfloat16, float16, float32")
    check_weight("w_down_t", w_down_t, (inter, hidden), w_down_t.dtype, w_down_t.device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    require_kernel(t, w_down_t, coefficients=True)
    tv = check_vector("t", t, inter, w_down_t.device, decode_batch(t.shape)[0])
    thr_t, thr_v = check_threshold(threshold, w_down_t.device, per_neuron=inter)
    if tv.shape[0] > 1:
        y = batch_ffn.batch_sparse_ffn(_core.KIND_T, False, None, tv, None, None, w_down_t, thr_t, thr_v,
                                       compact_max_batch=policy.compact_max_batch)
    else:
        y = _runtime.op_or_impl(_sparse_down_op, _sparse_down_impl)(tv.reshape(-1), w_down_t, thr_t, thr_v,
                                                                    policy.pdl)
    return y.reshape(*t.shape[:-1], hidden)


def coefficient_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                    threshold: float | torch.Tensor, *, act: str = "silu",
                    policy: KernelPolicy | str | None = None) -> torch.Tensor:
    """D-COUNTDOWN ideal in one kernel: t = act(W_gate x) * (W_up x) for every neuron, then the down
    projection over |t_i| > threshold. Reads all of W_gate and W_up, and only the kept rows of w_down_t.
    policy: as `sparse_down`'s."""
    policy = KernelPolicy.of(policy)
    xv, batch, inter = check_gated_call(x, w_gate, w_up, w_down_t, act)
    thr_t, thr_v = check_threshold(threshold, x.device, per_neuron=inter)
    if batch > 1:
        y = batch_ffn.batch_sparse_ffn(_core.KIND_T, True, xv, None, w_gate, w_up, w_down_t, thr_t, thr_v, act,
                                       compact_max_batch=policy.compact_max_batch)
    else:
        run = _runtime.op_or_impl(_coefficient_ffn_op, _coefficient_ffn_impl)
        y = run(xv.reshape(-1), w_gate, w_up, w_down_t, thr_t, thr_v, act, policy.pdl)
    return y.reshape(x.shape)
