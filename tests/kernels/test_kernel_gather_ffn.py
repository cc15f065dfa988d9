"""gather_ffn and fused_gather_ffn (CATS: dense gate; M-COUNTDOWN: dense up) against the reference."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import ON_GPU, SHAPES, cases, ids, kernels, reference, rel_err, threshold_for, tol, weights

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


# bf16 on the GPU only: the interpreter casts fp32 to bf16 by truncation, and the norm rounds twice
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else []),
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dense,score_act", VARIANTS[:2], ids=["cats", "m-countdown"])
def test_fused_with_the_norm_in_the_kernel(dtype, batch, dense, score_act):
    """x is an RMSNorm's input: one token normalizes in the kernel, 2-16 before the batch kernel."""
    hidden, inter = SHAPES[0]
    x, p = weights(hidden, inter, dtype, seed=17 + batch)
    x = (x.reshape(1, -1).float() * torch.linspace(0.5, 4.0, batch, device=x.device)[:, None]).to(dtype)
    g = torch.Generator().manual_seed(18)
    nw = (torch.rand(hidden, generator=g) + 0.5).to(x.device, dtype)
    norm = (nw, 1e-6)
    _, score = _score(reference.rms_norm(x, *norm), p, dense, score_act)
    thr = threshold_for(score, 0.6)
    w_dense, w_sparse = (p.w_gate, p.w_up) if dense == "gate" else (p.w_up, p.w_gate)
    kw = dict(dense=dense, score_act=score_act, norm=norm)
    out = kernels.fused_gather_ffn(x, w_dense, w_sparse, p.w_down_t, thr, **kw)
    ref = reference.fused_gather_ffn(x, w_dense, w_sparse, p.w_down_t, thr, **kw)
    assert out.shape == x.shape and rel_err(out, ref) <= tol(dtype)
    with pytest.raises(TypeError, match="x's dtype"):
        kernels.fused_gather_ffn(x, w_dense, w_sparse, p.w_down_t, thr, dense=dense, norm=(nw.double(), 1e-6))
