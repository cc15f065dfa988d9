"""The compacting down kernel of the batched path (``batch_ffn._down_compact_kernel``) against the reference.

Every op that ends in the batched down projection runs with ``KernelPolicy(compact_max_batch=16)`` so that
the public ops pick the compact configuration; launch configurations, per-neuron thresholds, empty and
full unions, and rows nobody keeps (poisoned with NaN: the kernel must never read them).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernel_cases import DEVICE, kernels, reference, rel_err, threshold_for, tol
from test_kernel_batch_ops import HIDDEN, INTER, _proj, batch_weights, check_launch_poisoned, run_op
from test_kernel_thresholds import vector_threshold

from countdown import KernelPolicy
from countdown.kernels import _core, batch_ffn

BASE = batch_ffn.pick_config(DEVICE)
COMPACT = dataclasses.replace(BASE, compact=True, scan_elems=64)


ALWAYS_COMPACT = KernelPolicy(compact_max_batch=16)


@pytest.fixture
def compact_ops(monkeypatch):
    """The public ops (given ALWAYS_COMPACT) run the compact down kernel; the test asserts it ran."""
    monkeypatch.setattr(batch_ffn, "_INDEX_SCRATCH", {})  # a fresh cache, to see the kernel allocate it
    yield ALWAYS_COMPACT
    assert batch_ffn._INDEX_SCRATCH, "the compact down kernel did not run"


def test_pick_config_by_batch():
    assert KernelPolicy().compact_max_batch == batch_ffn.COMPACT_MAX_BATCH == 4  # H100 A/B: compact for 2-4 tokens
    assert not batch_ffn.GPU_CONFIG.compact and batch_ffn.GPU_COMPACT_CONFIG.compact
    assert not batch_ffn.pick_config(DEVICE, 2, compact_max_batch=0).compact
    assert batch_ffn.pick_config(DEVICE, 4).compact
    assert not batch_ffn.pick_config(DEVICE, 5).compact
    assert not batch_ffn.pick_config(DEVICE).compact


OPS = ("cats", "mcd_fused", "sparse_down", "coefficient", "predicted", "predicted_bool")


@pytest.mark.parametrize("batch", (2, 7, 16))
@pytest.mark.parametrize("op", OPS)
def test_compact_ops_match_reference(compact_ops, op, batch):
    x, p = batch_weights(batch, torch.bfloat16, seed=batch * 17 + len(op))
    sparsity = 0.9 if batch == 2 else 0.7  # a small union (the case the kernel is for) and a large one
    out, ref, keep = run_op(op, x, p, sparsity=sparsity, thr_tensor=batch % 2 == 1, seed=batch, policy=compact_ops)
    assert out.shape == (batch, HIDDEN) and out.dtype == torch.bfloat16
    assert not (keep == keep[:1]).all()
    assert rel_err(out, ref) <= tol(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_compact_dtypes(compact_ops, dtype):
    x, p = batch_weights(3, dtype, seed=5)
    out, ref, _ = run_op("predicted", x, p, sparsity=0.8, seed=4, policy=compact_ops)
    assert rel_err(out, ref) <= tol(dtype)


# several neuron splits and column tiles, one program, one neuron per scan chunk step and many;
# outputs poisoned and each launch twice (workspace, tickets and index scratch reused)
CONFIGS = {
    "base": {},
    "one_split": dict(down_programs=1),
    "many_splits": dict(down_programs=64, block_n=16, h_tile=16),
    "big_blocks": dict(h_tile=64, block_n=32, scan_elems=4096),
    "tiny_scan": dict(scan_elems=16),
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind,compute", [(_core.KIND_UP, True), (_core.KIND_SCORE, False), (_core.KIND_T, False)],
                         ids=["up_computed", "score", "t"])
def test_compact_launch_configs_poisoned(kind, compute, config):
    check_launch_poisoned(dataclasses.replace(COMPACT, **CONFIGS[config]), kind, compute, 0.8,
                          seed=len(config) + kind)


@pytest.mark.parametrize("op", ["sparse_down", "dejavu_fused", "chess_predicted"])
def test_compact_vector_thresholds(op):
    """Per-neuron thresholds (with +-inf entries): in the prologue's union and, for a given t, again
    per token on the packed neurons (a union neuron is not kept by every token)."""
    batch = 4
    x, p = batch_weights(batch, torch.bfloat16, seed=len(op))
    t = reference.activation(_proj(x, p.w_gate), "silu") * _proj(x, p.w_up)
    if op == "sparse_down":
        thr = vector_threshold(t.abs(), 0.7, seed=2)
        ref = reference.sparse_down(t, p.w_down_t, thr)
        args = (_core.KIND_T, False, None, t)
    elif op == "dejavu_fused":
        thr = vector_threshold(_proj(x, p.w_gate), 0.7, seed=3)
        ref = reference.fused_gather_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr, score_act=False, signed=True)
        args = (_core.KIND_GATE, True, x, None)
    else:
        score = torch.randn(batch, INTER, device=DEVICE)
        thr = vector_threshold(score, 0.7, seed=4)
        ref = reference.predicted_sparse_ffn(x, score, p.w_gate, p.w_up, p.w_down_t, thr)
        args = (_core.KIND_SCORE, False, x, score)
    kind, compute, xx, vec = args
    for _ in range(2):
        out = torch.full((batch, HIDDEN), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        y = batch_ffn.launch(kind, compute, xx, vec, p.w_gate, p.w_up, p.w_down_t, thr, 0.0, "silu", False,
                             config=COMPACT, out=out, signed=op == "dejavu_fused")
        assert rel_err(y, ref) <= 1e-2


def test_compact_unkept_rows_are_never_read(compact_ops):
    """Down rows of neurons no token keeps hold NaN: any read of one would reach the output."""
    batch = 3
    x, p = batch_weights(batch, torch.float32, seed=21)
    score = torch.randn(batch, INTER, device=DEVICE)
    keep = score > threshold_for(score, 0.85)
    union = keep.any(0)
    ref = reference.predicted_sparse_ffn(x, keep, p.w_gate, p.w_up, p.w_down_t, 0.0)
    poisoned = p.w_down_t.clone()
    poisoned[~union] = float("nan")
    y = kernels.predicted_sparse_ffn(x, keep, p.w_gate, p.w_up, poisoned, 0.0, policy=compact_ops)
    assert rel_err(y, ref) <= tol(torch.float32)


def test_compact_empty_and_full_unions(compact_ops):
    x, p = batch_weights(3, torch.float32, seed=1)
    y = kernels.predicted_sparse_ffn(x, torch.randn(3, INTER, device=DEVICE), p.w_gate, p.w_up, p.w_down_t, 1e9,
                                     policy=compact_ops)
    assert torch.equal(y, torch.zeros_like(y))
    # token 0 keeps every neuron (a full union: every program packs all its neurons), token 1 none
    keep = torch.stack([torch.ones(INTER, dtype=torch.bool), torch.zeros(INTER, dtype=torch.bool)]).to(DEVICE)
    y = kernels.predicted_sparse_ffn(x[:2], keep, p.w_gate, p.w_up, p.w_down_t, 0.0, policy=compact_ops)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert rel_err(y[:1], reference.dense_ffn(x[:1], p.w_gate, p.w_up, p.w_down_t)) <= tol(torch.float32)
