"""Batched decode: shape errors, the availability reasons, the union helper, custom-op registration."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DEVICE, ON_GPU, kernels, reference, rel_err, threshold_for
from test_kernel_batch_ops import HIDDEN, INTER, batch_weights


def test_batch_shape_errors():
    x, p = batch_weights(17, torch.bfloat16, seed=2)
    u = x.float() @ p.w_up.float().t()
    with pytest.raises(ValueError, match="batch B = 17 > 16"):
        kernels.gather_ffn(x, u, p.w_gate, p.w_down_t, 0.1, dense="up")
    with pytest.raises(ValueError, match="batch B = 17 > 16"):
        kernels.sparse_down(u, p.w_down_t, 0.1)
    with pytest.raises(ValueError, match="score holds 3 token"):
        kernels.predicted_sparse_ffn(x[:4], u[:3], p.w_gate, p.w_up, p.w_down_t, 0.1)
    with pytest.raises(ValueError, match="a holds 4 token"):
        kernels.gather_ffn(x[:2], u[:4], p.w_gate, p.w_down_t, 0.1, dense="up")
    with pytest.raises(ValueError, match="prefill"):
        kernels.coefficient_ffn(x[:6].reshape(2, 3, HIDDEN), p.w_gate, p.w_up, p.w_down_t, 0.1)
    with pytest.raises(ValueError, match="a: prefill"):
        kernels.gather_ffn(x[:2, None], u[:4].reshape(2, 2, INTER), p.w_gate, p.w_down_t, 0.1, dense="up")


def test_batch_fallback_is_the_reference():
    """What the kernels refuse (B > 16, prefill) runs on the reference, which masks per token."""
    x, p = batch_weights(17, torch.bfloat16, seed=4)
    assert "batch B = 17" in kernels.kernel_unavailable_reason(x, p.w_down_t)
    assert "prefill" in kernels.kernel_unavailable_reason(x[:16].reshape(2, 8, HIDDEN), p.w_down_t)
    assert kernels.kernel_unavailable_reason(x[:16], p.w_down_t) is None
    t = torch.randn(17, INTER, device=DEVICE)
    assert "batch B = 17" in kernels.kernel_unavailable_reason(t, p.w_down_t, coefficients=True)
    y = reference.sparse_down(t, p.w_down_t, 0.5)
    y16 = kernels.sparse_down(t[:16], p.w_down_t, 0.5)
    assert rel_err(y16, y[:16]) <= 1e-2


def test_union_kept_fraction():
    keep = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert float(reference.union_kept_fraction(keep)) == 0.5
    assert reference.union_kept_fraction(torch.stack([keep, ~keep])).tolist() == [0.5, 0.75]
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(16, 100_000, generator=g) > 0.9  # independent masks, 10% kept each
    for b in (1, 2, 16):
        assert abs(float(reference.union_kept_fraction(masks[:b])) - (1 - 0.9**b)) < 0.01
    with pytest.raises(ValueError, match=r"\[..., B, I\]"):
        reference.union_kept_fraction(keep[0])


def test_batch_opcheck_and_compile():
    x, p = batch_weights(3, torch.bfloat16, seed=6)
    u = x.float() @ p.w_up.float().t()
    thr = torch.tensor([threshold_for(u.abs(), 0.5)], device=DEVICE)
    args = (x, None, p.w_gate, p.w_up, p.w_down_t, thr, 0.0, "silu", 2, True, False, False)
    torch.library.opcheck(torch.ops.countdown.batch_sparse_ffn.default, args,
                          test_utils=("test_schema", "test_faketensor"))

    def ffn(x, thr):
        return kernels.fused_gather_ffn(x, p.w_up, p.w_gate, p.w_down_t, thr, dense="up")

    compiled = torch.compile(ffn, backend="inductor" if ON_GPU else "aot_eager", fullgraph=True)
    ref = reference.fused_gather_ffn(x, p.w_up, p.w_gate, p.w_down_t, thr, dense="up")
    assert rel_err(compiled(x, thr), ref) <= 1e-2


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_batch_cuda_graph_with_threshold_tensor():
    x, p = batch_weights(8, torch.bfloat16, seed=8)
    score = torch.randn(8, INTER, device=DEVICE)
    thr = torch.zeros(1, device=DEVICE)
    kernels.predicted_sparse_ffn(x, score, p.w_gate, p.w_up, p.w_down_t, thr)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernels.predicted_sparse_ffn(x, score, p.w_gate, p.w_up, p.w_down_t, thr)
    for s in (0.0, 0.5, 0.9):
        score.copy_(torch.randn(8, INTER, device=DEVICE))
        thr.fill_(threshold_for(score, s))
        graph.replay()
        ref = reference.predicted_sparse_ffn(x, score, p.w_gate, p.w_up, p.w_down_t, thr)
        assert rel_err(y, ref) <= 1e-2
