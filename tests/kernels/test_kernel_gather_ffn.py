"""gather_ffn and fused_gather_ffn (CATS: dense gate; M-COUNTDOWN: dense up) against the reference."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import SHAPES, cases, ids, kernels, reference, rel_err, threshold_for, tol, weights

CASES = cases()
# (dense, score_act): CATS scores |act(gate)|, M-COUNTDOWN |up|; |gate| (DejaVu-like) also allowed.
VARIANTS = [("gate", True), ("up", False), ("gate", False)]


def _score(x, p, dense, score_act, act="silu"):
    a = x.float() @ (p.w_gate if dense == "gate" else p.w_up).float().t()
    return a, (reference.activation(a, act).abs() if score_act else a.abs())


@pytest.mark.parametrize("hidden,inter,dtype,sparsity", CASES, ids=ids(CASES))
@pytest.mark.parametrize("dense,score_act", VARIANTS[:2])
@pytest.mark.parametrize("fused", [False, True], ids=["given", "fused"])
def test_gather(hidden, inter, dtype, sparsity, dense, score_act, fused):
    x, p = weights(hidden, inter, dtype, seed=hidden * 3 + inter)
    a, score = _score(x, p, dense, score_act)
    thr = threshold_for(score, sparsity)
    w_dense, w_sparse = (p.w_gate, p.w_up) if dense == "gate" else (p.w_up, p.w_gate)
    kw = dict(dense=dense, score_act=score_act)
    if fused:
        out = kernels.fused_gather_ffn(x, w_dense, w_sparse, p.w_down_t, thr, **kw)
    else:
        out = kernels.gather_ffn(x, a.to(dtype), w_sparse, p.w_down_t, thr, **kw)
    ref = reference.gather_ffn(x, a.to(dtype) if not fused else a, w_sparse, p.w_down_t, thr, **kw)
    assert rel_err(out, ref) <= tol(dtype)


@pytest.mark.parametrize("fused", [False, True], ids=["given", "fused"])
def test_gather_abs_gate_score_and_gelu(fused):
    hidden, inter = SHAPES[0]
    x, p = weights(hidden, inter, torch.bfloat16, seed=5)
    a, score = _score(x, p, "gate", False, act="gelu_tanh")
    thr = threshold_for(score, 0.7)
    kw = dict(act="gelu_tanh", dense="gate", score_act=False)
    if fused:
        out = kernels.fused_gather_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr, **kw)
    else:
        out = kernels.gather_ffn(x, a, p.w_up, p.w_down_t, thr, **kw)
    assert rel_err(out, reference.gather_ffn(x, a, p.w_up, p.w_down_t, thr, **kw)) <= 1e-2
