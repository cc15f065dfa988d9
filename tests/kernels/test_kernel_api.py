"""Argument checks, path selection, and torch.library registration."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DEVICE, ON_GPU, SHAPES, kernels, reference, rel_err, threshold_for, weights


def test_argument_errors():
    hidden, inter = SHAPES[0]
    x, p = weights(hidden, inter, torch.bfloat16)
    a = torch.randn(inter, device=DEVICE)
    with pytest.raises(TypeError, match="w_sparse has dtype"):
        kernels.gather_ffn(x, a, p.w_up.float(), p.w_down_t, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.gather_ffn(x, a, p.w_up.t().contiguous().t(), p.w_down_t, 0.1)
    with pytest.raises(ValueError, match="a holds 1 token"):
        kernels.gather_ffn(x.expand(2, hidden), a, p.w_up, p.w_down_t, 0.1)
    with pytest.raises(ValueError, match=f"a must have {inter} values per token"):
        kernels.gather_ffn(x, a[:-1], p.w_up, p.w_down_t, 0.1)
    with pytest.raises(ValueError, match="dense must be"):
        kernels.gather_ffn(x, a, p.w_up, p.w_down_t, 0.1, dense="down")
    with pytest.raises(ValueError, match="score_act=True needs"):
        kernels.gather_ffn(x, a, p.w_gate, p.w_down_t, 0.1, dense="up", score_act=True)
    with pytest.raises(ValueError, match="unknown activation"):
        kernels.coefficient_ffn(x, p.w_gate, p.w_up, p.w_down_t, 0.1, act="tanh")
    with pytest.raises(TypeError, match="threshold must be"):
        kernels.sparse_down(a, p.w_down_t, "0.1")
    with pytest.raises(ValueError, match="one value"):
        kernels.sparse_down(a, p.w_down_t, torch.zeros(2, device=DEVICE))
    with pytest.raises(TypeError, match="x has dtype"):
        kernels.coefficient_ffn(x.to(torch.int32), p.w_gate, p.w_up, p.w_down_t, 0.1)


def test_kernel_unavailable_reason():
    hidden, inter = SHAPES[0]
    x, p = weights(hidden, inter, torch.bfloat16)
    assert kernels.kernel_unavailable_reason(x, p.w_down_t) is None
    assert kernels.kernel_unavailable_reason(x.expand(3, hidden), p.w_down_t) is None  # a decode batch
    assert kernels.kernel_unavailable_reason(x.expand(16, 1, hidden), p.w_down_t) is None
    assert "batch B = 17 > 16" in kernels.kernel_unavailable_reason(x.expand(17, hidden), p.w_down_t)
    assert "prefill" in kernels.kernel_unavailable_reason(x.expand(1, 5, hidden), p.w_down_t)
    assert "does not end in" in kernels.kernel_unavailable_reason(x[:-1], p.w_down_t)
    assert "not supported" in kernels.kernel_unavailable_reason(x.float(), p.w_down_t)
    if ON_GPU:
        assert "CUDA" in kernels.kernel_unavailable_reason(x.cpu(), p.w_down_t.cpu())


def test_opcheck_and_compile():
    """The ops have correct fake (meta) kernels and trace under torch.compile without graph breaks."""
    hidden, inter = SHAPES[0]
    x, p = weights(hidden, inter, torch.bfloat16, seed=2)
    g = x.float() @ p.w_gate.float().t()
    thr = torch.tensor([threshold_for(reference.activation(g, "silu").abs(), 0.5)], device=DEVICE)
    args = (x, p.w_gate, p.w_up, p.w_down_t, thr, 0.0, "silu", True, True, False)
    torch.library.opcheck(torch.ops.countdown.fused_gather_ffn.default, args,
                          test_utils=("test_schema", "test_faketensor"))

    def ffn(x, thr):
        return kernels.fused_gather_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr)

    backend = "inductor" if ON_GPU else "aot_eager"
    compiled = torch.compile(ffn, backend=backend, fullgraph=True)
    ref = reference.fused_gather_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr)
    assert rel_err(compiled(x, thr), ref) <= 1e-2


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_with_threshold_tensor():
    hidden, inter = SHAPES[0]
    x, p = weights(hidden, inter, torch.bfloat16, seed=4)
    score = torch.randn(inter, device=DEVICE)
    thr = torch.zeros(1, device=DEVICE)
    kernels.predicted_sparse_ffn(x, score, p.w_gate, p.w_up, p.w_down_t, thr)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernels.predicted_sparse_ffn(x, score, p.w_gate, p.w_up, p.w_down_t, thr)
    for s in (0.0, 0.5, 0.9):
        thr.fill_(threshold_for(score, s))
        score.copy_(torch.randn(inter, device=DEVICE))
        thr.fill_(threshold_for(score, s))
        graph.replay()
        ref = reference.predicted_sparse_ffn(x, score, p.w_gate, p.w_up, p.w_down_t, thr)
        assert rel_err(y, ref) <= 1e-2
