"""Every op on decode batches of 2..16 tokens (batch_ffn) against the reference, which masks per token."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernel_cases import DEVICE, ON_GPU, SHAPES, kernels, layout, reference, rel_err, threshold_for, tol

from countdown.kernels import _core, batch_ffn

BATCHES = (2, 3, 5, 16)
# interpreter: odd H, I (not multiples of 16, the kernels' tile sides); GPU: the model shapes
HIDDEN, INTER = (SHAPES[0] if ON_GPU else (40, 136))


def batch_weights(batch: int, dtype: torch.dtype, seed: int, hidden: int = HIDDEN, inter: int = INTER):
    """Fresh random non-zero weights and B tokens, each token its own direction."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    wg = torch.randn(inter, hidden, generator=g) / hidden**0.5
    wu = torch.randn(inter, hidden, generator=g) / hidden**0.5
    wd = torch.randn(hidden, inter, generator=g) / inter**0.5
    x = torch.randn(batch, hidden, generator=g)
    to = dict(dtype=dtype, device=DEVICE)
    return x.to(**to), layout(wg.to(**to), wu.to(**to), wd.to(**to))


def _proj(x, w):
    return x.float() @ w.float().t()


def run_op(op: str, x, p, sparsity: float, thr_tensor: bool = False, seed: int = 0, policy=None):
    """(kernel output, reference output, per-token keep mask [B, I]) for one op on one batch, under the
    kernel ``policy`` (default: KernelPolicy())."""
    g, u = _proj(x, p.w_gate), _proj(x, p.w_up)
    args: tuple
    if op in ("cats", "cats_fused"):
        score, kw = reference.activation(g, "silu").abs(), dict(dense="gate")
    elif op in ("mcd", "mcd_fused"):
        score, kw = u.abs(), dict(dense="up")
    elif op in ("sparse_down", "coefficient"):
        t = reference.activation(g, "silu") * u
        score, kw = t.abs(), {}
    elif op == "predicted":
        score = torch.randn(x.shape[0], p.intermediate_size, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        kw = {}
    elif op == "predicted_bool":
        mask = torch.rand(x.shape[0], p.intermediate_size, generator=torch.Generator().manual_seed(seed)) > sparsity
        score, kw = mask.to(DEVICE), {}
    else:
        raise ValueError(op)
    thr = 0.0 if score.dtype == torch.bool else threshold_for(score, sparsity)
    keep = score if score.dtype == torch.bool else score > thr
    if thr_tensor:
        thr = torch.tensor([thr], device=DEVICE)
    if op == "cats":
        args = (x, g, p.w_up, p.w_down_t, thr)
    elif op == "mcd":
        args = (x, u, p.w_gate, p.w_down_t, thr)
    elif op == "cats_fused":
        args = (x, p.w_gate, p.w_up, p.w_down_t, thr)
    elif op == "mcd_fused":
        args = (x, p.w_up, p.w_gate, p.w_down_t, thr)
    elif op == "sparse_down":
        args = (t, p.w_down_t, thr)
    elif op == "coefficient":
        args = (x, p.w_gate, p.w_up, p.w_down_t, thr)
    else:
        args = (x, score, p.w_gate, p.w_up, p.w_down_t, thr)
    name = {"cats": "gather_ffn", "mcd": "gather_ffn", "cats_fused": "fused_gather_ffn",
            "mcd_fused": "fused_gather_ffn", "coefficient": "coefficient_ffn",
            "predicted": "predicted_sparse_ffn", "predicted_bool": "predicted_sparse_ffn"}.get(op, op)
    out = getattr(kernels, name)(*args, **kw, policy=policy)
    ref = getattr(reference, name)(*args, **kw)
    return out, ref, keep


OPS = ("cats", "mcd", "cats_fused", "mcd_fused", "sparse_down", "coefficient", "predicted", "predicted_bool")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("op", OPS)
def test_batch_op_matches_reference(op, batch):
    x, p = batch_weights(batch, torch.bfloat16, seed=batch * 31 + len(op))
    out, ref, keep = run_op(op, x, p, sparsity=0.7, thr_tensor=batch % 2 == 1, seed=batch)
    assert out.shape == x.shape[:-1] + (HIDDEN,) and out.dtype == torch.bfloat16
    # the tokens keep different neurons: a leak between tokens would show against the reference
    assert not (keep == keep[:1]).all()
    assert rel_err(out, ref) <= tol(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("op", ["mcd_fused", "predicted", "sparse_down", "coefficient"])
def test_batch_dtypes(op, dtype):
    x, p = batch_weights(3, dtype, seed=7 + len(op))
    out, ref, _ = run_op(op, x, p, sparsity=0.5, seed=3)
    assert rel_err(out, ref) <= tol(dtype)


def test_batch_equals_each_token_alone():
    """Token b's output in a batch is the batch-1 kernel's output for token b alone (no leak)."""
    x, p = batch_weights(3, torch.float32, seed=11)
    thr = threshold_for(_proj(x, p.w_up).abs(), 0.8)
    y = kernels.fused_gather_ffn(x, p.w_up, p.w_gate, p.w_down_t, thr, dense="up")
    for b in range(3):
        alone = kernels.fused_gather_ffn(x[b], p.w_up, p.w_gate, p.w_down_t, thr, dense="up")  # batch-1 kernel
        assert rel_err(y[b], alone) <= tol(torch.float32)
    # exact per-token isolation: token 1 keeps nothing, token 0 keeps everything
    keep_all = torch.stack([torch.ones(INTER, dtype=torch.bool), torch.zeros(INTER, dtype=torch.bool)]).to(DEVICE)
    y = kernels.predicted_sparse_ffn(x[:2], keep_all, p.w_gate, p.w_up, p.w_down_t, 0.0)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    dense = reference.dense_ffn(x[:1], p.w_gate, p.w_up, p.w_down_t)
    assert rel_err(y[:1], dense) <= tol(torch.float32)
    y = kernels.predicted_sparse_ffn(x[:2], keep_all.flip(0), p.w_gate, p.w_up, p.w_down_t, 0.0)
    assert torch.equal(y[0], torch.zeros_like(y[0]))


def test_batch_shapes_b11h_and_threshold_tensor():
    x, p = batch_weights(4, torch.bfloat16, seed=3)
    u = _proj(x, p.w_up)
    thr = torch.tensor(threshold_for(u.abs(), 0.6), device=DEVICE)  # 0-d tensor
    out = kernels.gather_ffn(x[:, None, :], u[:, None, :], p.w_gate, p.w_down_t, thr, dense="up")
    assert out.shape == (4, 1, HIDDEN)
    ref = reference.gather_ffn(x, u, p.w_gate, p.w_down_t, thr, dense="up")
    assert rel_err(out[:, 0], ref) <= 1e-2


# Launch configurations of the batched kernels: several neuron splits and column tiles (atomics and
# per-tile tickets), one program, odd steps; the outputs are poisoned and each runs twice (the
# persistent workspace must be left zero).
BASE = batch_ffn.pick_config(DEVICE)
CONFIGS = {
    "base": {},
    "one_split": dict(down_programs=1),
    "many_splits": dict(down_programs=64, block_n=16, h_tile=16),
    "big_blocks": dict(block_i=32, block_k=32, h_tile=64, block_n=32),
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind,compute", [(_core.KIND_UP, True), (_core.KIND_SCORE, False), (_core.KIND_T, False)],
                         ids=["up_computed", "score", "t"])
def test_batch_launch_configs_poisoned(kind, compute, config):
    check_launch_poisoned(dataclasses.replace(BASE, **CONFIGS[config]), kind, compute, 0.6, seed=len(config) + kind)


def check_launch_poisoned(cfg: batch_ffn.BatchConfig, kind: int, compute: bool, s: float, seed: int) -> None:
    """``batch_ffn.launch`` with ``cfg`` on 5 tokens, twice into a NaN-filled ``out``, against the reference
    (kind UP computed: M-COUNTDOWN fused; SCORE: a given predictor score; T: a given coefficient)."""
    batch = 5
    x, p = batch_weights(batch, torch.bfloat16, seed=seed)
    if kind == _core.KIND_UP:
        vec, thr = None, threshold_for(_proj(x, p.w_up).abs(), s)
        ref = reference.fused_gather_ffn(x, p.w_up, p.w_gate, p.w_down_t, thr, dense="up")
    elif kind == _core.KIND_SCORE:
        vec = torch.randn(batch, INTER, device=DEVICE)
        thr = threshold_for(vec, s)
        ref = reference.predicted_sparse_ffn(x, vec, p.w_gate, p.w_up, p.w_down_t, thr)
    else:
        vec = reference.activation(_proj(x, p.w_gate), "silu") * _proj(x, p.w_up)
        thr = threshold_for(vec.abs(), s)
        ref = reference.sparse_down(vec, p.w_down_t, thr)
    for _ in range(2):
        out = torch.full((batch, HIDDEN), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        y = batch_ffn.launch(kind, compute, None if kind == _core.KIND_T else x, vec, p.w_gate, p.w_up, p.w_down_t,
                             None, thr, "silu", False, config=cfg, out=out)
        assert y.data_ptr() == out.data_ptr()
        assert rel_err(y, ref) <= 1e-2


def test_batch_nothing_kept_gives_zeros():
    x, p = batch_weights(3, torch.float32, seed=1)
    y = kernels.predicted_sparse_ffn(x, torch.randn(3, INTER, device=DEVICE), p.w_gate, p.w_up, p.w_down_t, 1e9)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("act", ["gelu_tanh", "relu"])
def test_batch_activations(act):
    x, p = batch_weights(2, torch.bfloat16, seed=13)
    g = _proj(x, p.w_gate)
    thr = threshold_for(reference.activation(g, act).abs(), 0.5)
    out = kernels.fused_gather_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr, act=act)
    assert rel_err(out, reference.fused_gather_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr, act=act)) <= 1e-2
