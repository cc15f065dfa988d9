"""sparse_down and coefficient_ffn (D-COUNTDOWN ideal) against the pure-torch reference."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import (DEVICE, SHAPES, cases, ids, kernels, reference, rel_err, threshold_for, tol,
                          weights)

CASES = cases()


@pytest.mark.parametrize("hidden,inter,dtype,sparsity", CASES, ids=ids(CASES))
def test_sparse_down(hidden, inter, dtype, sparsity):
    x, p = weights(hidden, inter, dtype, seed=hidden + inter)
    t = reference.activation(x.float() @ p.w_gate.float().t(), "silu") * (x.float() @ p.w_up.float().t())
    thr = threshold_for(t.abs(), sparsity)
    out = kernels.sparse_down(t, p.w_down_t, thr)
    ref = reference.sparse_down(t, p.w_down_t, thr)
    assert rel_err(out, ref) <= tol(dtype)


@pytest.mark.parametrize("hidden,inter", SHAPES[:1])
def test_sparse_down_t_in_weight_dtype_and_batch_shape(hidden, inter):
    x, p = weights(hidden, inter, torch.bfloat16, seed=3)
    t = torch.randn(1, 1, inter, device=DEVICE).to(torch.bfloat16)
    thr = threshold_for(t.abs(), 0.7)
    out = kernels.sparse_down(t, p.w_down_t, torch.tensor([thr], device=DEVICE))
    assert out.shape == (1, 1, hidden)
    assert rel_err(out, reference.sparse_down(t, p.w_down_t, thr)) <= 1e-2


@pytest.mark.parametrize("hidden,inter,dtype,sparsity", CASES, ids=ids(CASES))
def test_coefficient_ffn(hidden, inter, dtype, sparsity):
    x, p = weights(hidden, inter, dtype, seed=7 * hidden + inter)
    t = reference.activation(x.float() @ p.w_gate.float().t(), "silu") * (x.float() @ p.w_up.float().t())
    thr = threshold_for(t.abs(), sparsity)
    out = kernels.coefficient_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr)
    ref = reference.coefficient_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr)
    assert rel_err(out, ref) <= tol(dtype)


@pytest.mark.parametrize("act", ["gelu_tanh", "gelu", "relu"])
def test_coefficient_ffn_activations(act):
    hidden, inter = SHAPES[0]
    x, p = weights(hidden, inter, torch.bfloat16, seed=11)
    t = reference.activation(x.float() @ p.w_gate.float().t(), act) * (x.float() @ p.w_up.float().t())
    thr = threshold_for(t.abs(), 0.5)
    out = kernels.coefficient_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr, act=act)
    assert rel_err(out, reference.coefficient_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr, act=act)) <= 1e-2
