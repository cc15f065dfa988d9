"""D-COUNTDOWN (practical): gate, up and down rows read only for the neurons a predictor selects.

    predicted_sparse_ffn(x, score, w_gate, w_up, w_down_t, thr, act)
        kept: score_i > thr (signed: a predictor's logits; a bool mask keeps True and ignores thr)
        y = sum over kept i of act(W_gate[i] . x) * (W_up[i] . x) * w_down_t[i, :]

Shapes: x [H] / [B, H] / [B, 1, H] with B <= 16 tokens (B >= 2 runs ``batch_ffn``: each token keeps
its own neurons, the union's rows are read once), score [I] / [B, I] / [B, 1, I] (float, bool or uint8),
w_gate / w_up / w_down_t [I, H] contiguous in x's dtype (bf16, fp16, fp32; W_down transposed).
threshold: Python float, 1-element float tensor or [I] float32 per-neuron thresholds. Output: x's shape and dtype; fp32 accumulation.
Nothing of a neuron that fails the test is read: cost scales with the kept fraction.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _core, _runtime, batch_ffn
from ..options import KernelPolicy
from .pack import check_gated_call, check_threshold, check_vector


__all__ = ["predicted_sparse_ffn"]


def _predicted_impl(x: torch.Tensor, score: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                    w_down_t: torch.Tensor, threshold: Optional[torch.Tensor], threshold_value: float,
                    act: str, pdl: bool = True) -> torch.Tensor:
    return _core.launch(_core.KIND_SCORE, False, x, score, w_gate, w_up, w_down_t, threshold, threshold_value,
                        act, False, x.dtype, pdl=pdl)


_predicted_op = torch.library.custom_op("countdown::predicted_sparse_ffn", _predicted_impl,
                                        mutates_args=())


@_predicted_op.register_fake
def _(x, score, w_gate, w_up, w_down_t, threshold, threshold_value, act, pdl=True):
    return x.new_empty(w_down_t.shape[1])


def predicted_sparse_ffn(x: torch.Tensor, score: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                         w_down_t: torch.Tensor, threshold: float | torch.Tensor, *,
                         act: str = "silu", policy: KernelPolicy | str | None = None) -> torch.Tensor:
    """D-COUNTDOWN practical; see the module docstring. policy (`countdown.KernelPolicy`): its ``pdl``
    (batch 1) and ``compact_max_batch`` (batch 2-16)."""
    policy = KernelPolicy.of(policy)
    xv, batch, inter = check_gated_call(x, w_gate, w_up, w_down_t, act)
    sv = check_vector("score", score, inter, x.device, batch, allow_bool=True)
    if sv.dtype == torch.bool:
        sv, thr_t, thr_v = sv.view(torch.uint8), None, 0.5
    else:
        thr_t, thr_v = check_threshold(threshold, x.device, per_neuron=inter)
    if batch > 1:
        y = batch_ffn.batch_sparse_ffn(_core.KIND_SCORE, False, xv, sv, w_gate, w_up, w_down_t, thr_t, thr_v, act,
                                       compact_max_batch=policy.compact_max_batch)
    else:
        run = _runtime.op_or_impl(_predicted_op, _predicted_impl)
        y = run(xv.reshape(-1), sv.reshape(-1), w_gate, w_up, w_down_t, thr_t, thr_v, act, policy.pdl)
    return y.reshape(x.shape)
