"""CATS and M-COUNTDOWN: one projection dense, the other two only over the neurons that pass.

    gather_ffn(x, a, w_sparse, w_down_t, thr, act, dense, score_act, signed)
        a is the dense projection, already computed (e.g. by cuBLAS):
        dense="gate": a = W_gate x (pre-activation), w_sparse = W_up,   t_i = act(a_i) * (W_up[i] . x)
        dense="up":   a = W_up x,                    w_sparse = W_gate, t_i = act(W_gate[i] . x) * a_i
        kept: score_i > thr_i with score = |act(a)| (score_act, default for dense="gate": CATS)
                                        or |a|      (default for dense="up": M-COUNTDOWN)
                                        or a / act(a) themselves with signed=True (DejaVu: g_i > thr)
        y = sum over kept i of t_i * w_down_t[i, :]
    fused_gather_ffn(x, w_dense, w_sparse, w_down_t, thr, act, dense, score_act, signed)
        the same, with a = w_dense x computed in the same kernel (one launch for the whole FFN).

Shapes: x [H] / [B, H] / [B, 1, H] with B <= 16 tokens (B >= 2 runs ``batch_ffn``: each token keeps
its own neurons, the union's rows are read once), a [I] / [B, I] / [B, 1, I] (any float dtype), w_dense /
w_sparse / w_down_t [I, H] contiguous in x's dtype (bf16, fp16, fp32; W_down transposed).
threshold: Python float, 1-element float tensor, or [I] contiguous float32 tensor of per-neuron
thresholds thr_i, the same for every token (CHESS: thr_i = τ / E|u_i|). Output: x's shape and dtype;
fp32 accumulation.
Rows of w_sparse and w_down_t of neurons that fail the test are never read.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _core, _runtime, batch_ffn
from ..options import KernelPolicy
from .pack import check_act, check_down, check_gather_mode, check_input, check_threshold, check_vector, check_weight


__all__ = ["gather_ffn", "fused_gather_ffn"]


def _kind(dense_is_gate: bool) -> int:
    return _core.KIND_GATE if dense_is_gate else _core.KIND_UP


def _gather_ffn_impl(x: torch.Tensor, a: torch.Tensor, w_sparse: torch.Tensor, w_down_t: torch.Tensor,
                     threshold: Optional[torch.Tensor], threshold_value: float, act: str, dense_is_gate: bool,
                     score_act: bool, signed: bool, pdl: bool = True) -> torch.Tensor:
    w_gate, w_up = (None, w_sparse) if dense_is_gate else (w_sparse, None)
    return _core.launch(_kind(dense_is_gate), False, x, a, w_gate, w_up, w_down_t, threshold, threshold_value,
                        act, score_act, x.dtype, signed=signed, pdl=pdl)


_gather_ffn_op = torch.library.custom_op("countdown::gather_ffn", _gather_ffn_impl, mutates_args=())


@_gather_ffn_op.register_fake
def _(x, a, w_sparse, w_down_t, threshold, threshold_value, act, dense_is_gate, score_act, signed, pdl=True):
    return x.new_empty(w_down_t.shape[1])


def _fused_gather_ffn_impl(x: torch.Tensor, w_dense: torch.Tensor, w_sparse: torch.Tensor, w_down_t: torch.Tensor,
                           threshold: Optional[torch.Tensor], threshold_value: float, act: str,
                           dense_is_gate: bool, score_act: bool, signed: bool, pdl: bool = True) -> torch.Tensor:
    w_gate, w_up = (w_dense, w_sparse) if dense_is_gate else (w_sparse, w_dense)
    return _core.launch(_kind(dense_is_gate), True, x, None, w_gate, w_up, w_down_t, threshold, threshold_value,
                        act, score_act, x.dtype, signed=signed, pdl=pdl)


_fused_gather_ffn_op = torch.library.custom_op("countdown::fused_gather_ffn", _fused_gather_ffn_impl,
                                               mutates_args=())


@_fused_gather_ffn_op.register_fake
def _(x, w_dense, w_sparse, w_down_t, threshold, threshold_value, act, dense_is_gate, score_act, signed, pdl=True):
    return x.new_empty(w_down_t.shape[1])


def _common(x, weights, w_down_t, threshold, act, dense, score_act, signed):
    inter, hidden = check_down(w_down_t)
    for name, w in weights + (("w_down_t", w_down_t),):
        check_weight(name, w, (inter, hidden), w_down_t.dtype, w_down_t.device)
    check_act(act)
    score_act = check_gather_mode(dense, score_act)
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {signed!r}")
    xv, batch = check_input(x, w_down_t)
    thr_t, thr_v = check_threshold(threshold, x.device, per_neuron=inter)
    return xv, batch, inter, thr_t, thr_v, score_act


def gather_ffn(x: torch.Tensor, a: torch.Tensor, w_sparse: torch.Tensor, w_down_t: torch.Tensor,
               threshold: float | torch.Tensor, *, act: str = "silu", dense: str = "gate",
               score_act: bool | None = None, signed: bool = False,
               policy: KernelPolicy | str | None = None) -> torch.Tensor:
    """CATS (dense="gate") / M-COUNTDOWN (dense="up") given the dense projection a; see the module doc.
    signed=True keeps score_i > thr_i on the signed score (DejaVu: a = W_gate x, score_act=False).
    policy (`countdown.KernelPolicy`): its ``pdl`` (batch 1) and ``compact_max_batch`` (batch 2-16)."""
    policy = KernelPolicy.of(policy)
    xv, batch, inter, thr_t, thr_v, score_act = _common(x, (("w_sparse", w_sparse),), w_down_t, threshold, act,
                                                        dense, score_act, signed)
    av = check_vector("a", a, inter, x.device, batch)
    if batch > 1:
        w_gate, w_up = (None, w_sparse) if dense == "gate" else (w_sparse, None)
        y = batch_ffn.batch_sparse_ffn(_kind(dense == "gate"), False, xv, av, w_gate, w_up, w_down_t, thr_t, thr_v,
                                       act, score_act, signed, policy.compact_max_batch)
    else:
        run = _runtime.op_or_impl(_gather_ffn_op, _gather_ffn_impl)
        y = run(xv.reshape(-1), av.reshape(-1), w_sparse, w_down_t, thr_t, thr_v, act, dense == "gate", score_act,
                signed, policy.pdl)
    return y.reshape(x.shape)


def fused_gather_ffn(x: torch.Tensor, w_dense: torch.Tensor, w_sparse: torch.Tensor, w_down_t: torch.Tensor,
                     threshold: float | torch.Tensor, *, act: str = "silu", dense: str = "gate",
                     score_act: bool | None = None, signed: bool = False,
                     policy: KernelPolicy | str | None = None) -> torch.Tensor:
    """``gather_ffn`` with a = w_dense x computed in the same kernel (w_dense = W_gate or W_up)."""
    policy = KernelPolicy.of(policy)
    xv, batch, _, thr_t, thr_v, score_act = _common(x, (("w_dense", w_dense), ("w_sparse", w_sparse)), w_down_t,
                                                    threshold, act, dense, score_act, signed)
    if batch > 1:
        w_gate, w_up = (w_dense, w_sparse) if dense == "gate" else (w_sparse, w_dense)
        y = batch_ffn.batch_sparse_ffn(_kind(dense == "gate"), True, xv, None, w_gate, w_up, w_down_t, thr_t, thr_v,
                                       act, score_act, signed, policy.compact_max_batch)
    else:
        run = _runtime.op_or_impl(_fused_gather_ffn_op, _fused_gather_ffn_impl)
        y = run(xv.reshape(-1), w_dense, w_sparse, w_down_t, thr_t, thr_v, act, dense == "gate", score_act, signed,
                policy.pdl)
    return y.reshape(x.shape)
