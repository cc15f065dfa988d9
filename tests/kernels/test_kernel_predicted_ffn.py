"""predicted_sparse_ffn (D-COUNTDOWN practical) against the reference."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DEVICE, SHAPES, cases, ids, kernels, reference, rel_err, threshold_for, tol, weights

CASES = cases()


@pytest.mark.parametrize("hidden,inter,dtype,sparsity", CASES, ids=ids(CASES))
def test_predicted(hidden, inter, dtype, sparsity):
    x, p = weights(hidden, inter, dtype, seed=hidden + 5 * inter)
    score = torch.randn(inter, device=DEVICE)  # a predictor's logits: signed, kept when > thr
    thr = threshold_for(score, sparsity)
    out = kernels.predicted_sparse_ffn(x, score, p.w_gate, p.w_up, p.w_down_t, thr)
    ref = reference.predicted_sparse_ffn(x, score, p.w_gate, p.w_up, p.w_down_t, thr)
    assert rel_err(out, ref) <= tol(dtype)


def test_predicted_bool_mask_and_tensor_threshold():
    hidden, inter = SHAPES[0]
    x, p = weights(hidden, inter, torch.bfloat16, seed=9)
    mask = torch.rand(inter, device=DEVICE) < 0.2
    out = kernels.predicted_sparse_ffn(x, mask, p.w_gate, p.w_up, p.w_down_t, 123.0)  # bool: thr ignored
    assert rel_err(out, reference.predicted_sparse_ffn(x, mask, p.w_gate, p.w_up, p.w_down_t, 0.0)) <= 1e-2
    score = torch.randn(1, inter, device=DEVICE, dtype=torch.bfloat16)
    thr = torch.tensor(threshold_for(score, 0.8), device=DEVICE)
    out = kernels.predicted_sparse_ffn(x.reshape(1, hidden), score, p.w_gate, p.w_up, p.w_down_t, thr)
    assert out.shape == (1, hidden)
    ref = reference.predicted_sparse_ffn(x.reshape(1, hidden), score, p.w_gate, p.w_up, p.w_down_t, thr)
    assert rel_err(out, ref) <= 1e-2
