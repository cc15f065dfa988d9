"""Per-neuron threshold vectors (CHESS, S-COUNTDOWN) and signed scores (DejaVu) in every FFN op, at batch
1 (``_core``) and 2..16 (``batch_ffn``), against the pure-torch reference on fresh random non-zero inputs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kernel_cases import DEVICE, ON_GPU, SHAPES, SMALL, kernels, layout, reference, rel_err, threshold_for, tol

from countdown.kernels import _core, batch_ffn


def make(batch: int, hidden: int, inter: int, dtype: torch.dtype, seed: int):
    """Fresh random non-zero weights (packed) and tokens x: [H] for batch 0 (one token, unbatched), else [B, H]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    wg = torch.randn(inter, hidden, generator=g) / hidden**0.5
    wu = torch.randn(inter, hidden, generator=g) / hidden**0.5
    wd = torch.randn(hidden, inter, generator=g) / inter**0.5
    x = torch.randn(max(batch, 1), hidden, generator=g)
    x = x[0] if batch == 0 else x
    to = dict(dtype=dtype, device=DEVICE)
    return x.to(**to), layout(wg.to(**to), wu.to(**to), wd.to(**to))


def vector_threshold(score: torch.Tensor, sparsity: float, seed: int) -> torch.Tensor:
    """Per-neuron thresholds [I] (fp32, contiguous): the pooled ``sparsity``-quantile of ``score`` [.., I]
    plus a random offset per neuron (normal, half the scores' spread), so that neurons get different
    thresholds. Where a
    threshold lies within 2% of one of its neuron's scores it becomes +inf or -inf (never / always kept),
    so rounding differences between kernel and reference cannot flip a neuron (and infinities are tested)."""
    s = score.float().reshape(-1, score.shape[-1]).cpu()
    inter = s.shape[-1]
    g = torch.Generator().manual_seed(seed)
    thr = threshold_for(s, sparsity) + 0.5 * float(s.std()) * torch.randn(inter, generator=g)
    close = ((s - thr).abs() <= 0.02 * thr.abs() + 1e-6).any(dim=0)
    inf = torch.where(torch.rand(inter, generator=g) < 0.5, math.inf, -math.inf)
    return torch.where(close, inf, thr).float().contiguous().to(DEVICE)


def _proj(x, w):
    return x.float() @ w.float().t()


# op name -> (function name, score of the dense inputs (x, p) -> [.., I], keyword arguments)
OPS = {
    "cats": "gather_ffn", "cats_fused": "fused_gather_ffn", "mcd_fused": "fused_gather_ffn",
    "dejavu": "gather_ffn", "dejavu_fused": "fused_gather_ffn", "signed_act_fused": "fused_gather_ffn",
    "mcd_signed": "gather_ffn", "coefficient": "coefficient_ffn", "sparse_down": "sparse_down",
    "predicted": "predicted_sparse_ffn",
}
KW = {"cats": dict(dense="gate"), "cats_fused": dict(dense="gate"), "mcd_fused": dict(dense="up"),
      "dejavu": dict(dense="gate", score_act=False, signed=True),
      "dejavu_fused": dict(dense="gate", score_act=False, signed=True),
      "signed_act_fused": dict(dense="gate", score_act=True, signed=True),
      "mcd_signed": dict(dense="up", signed=True)}


def run_op(op: str, x, p, threshold_of, seed: int = 0):
    """(kernel output, reference output, score) of ``op`` with the threshold ``threshold_of(score)``."""
    g, u = _proj(x, p.w_gate), _proj(x, p.w_up)
    kw = KW.get(op, {})
    if op in ("coefficient", "sparse_down"):
        t = reference.activation(g, "silu") * u
        score = t.abs()
    elif op == "predicted":
        score = torch.randn(g.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    else:
        a = g if kw["dense"] == "gate" else u
        score = reference.activation(a, "silu") if kw.get("score_act", kw["dense"] == "gate") else a
        score = score if kw.get("signed") else score.abs()
    thr = threshold_of(score)
    dense, sparse = (p.w_gate, p.w_up) if kw.get("dense", "gate") == "gate" else (p.w_up, p.w_gate)
    if op in ("cats", "dejavu"):
        args = (x, g.to(x.dtype), sparse, p.w_down_t, thr)
    elif op == "mcd_signed":
        args = (x, u.to(x.dtype), sparse, p.w_down_t, thr)
    elif OPS[op] == "fused_gather_ffn":
        args = (x, dense, sparse, p.w_down_t, thr)
    elif op == "coefficient":
        args = (x, p.w_gate, p.w_up, p.w_down_t, thr)
    elif op == "sparse_down":
        args = (t, p.w_down_t, thr)
    else:
        args = (x, score, p.w_gate, p.w_up, p.w_down_t, thr)
    name = OPS[op]
    return getattr(kernels, name)(*args, **kw), getattr(reference, name)(*args, **kw), score


# batch 1: bf16 at two sparsities on the first shape, fp16 / fp32 on the second (the interpreter runs
# fp32 arithmetic either way; on a GPU these are the real dtypes)
B1_CASES = [(SHAPES[0], torch.bfloat16, 0.5), (SHAPES[0], torch.bfloat16, 0.9), (SHAPES[-1], torch.float16, 0.5),
            (SHAPES[-1], torch.float32, 0.7)]
B1_IDS = [f"{h}x{i}-{str(d).split('.')[-1]}-s{s}" for (h, i), d, s in B1_CASES]


@pytest.mark.parametrize("shape,dtype,sparsity", B1_CASES, ids=B1_IDS)
@pytest.mark.parametrize("op", list(OPS))
def test_vector_threshold_one_token(op, shape, dtype, sparsity):
    x, p = make(0, *shape, dtype, seed=len(op) + int(10 * sparsity))
    thr_of = lambda s: vector_threshold(s, sparsity, seed=3)  # noqa: E731
    out, ref, score = run_op(op, x, p, thr_of, seed=1)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, ref) <= tol(dtype)
    # the vector matters: one scalar threshold (its pooled quantile) keeps other neurons
    thr = thr_of(score)
    assert not torch.equal(score.float() > thr, score.float() > threshold_for(score, sparsity))


@pytest.mark.parametrize("op", ["dejavu", "dejavu_fused", "signed_act_fused", "mcd_signed"])
@pytest.mark.parametrize("thr_kind", ["float", "tensor"])
def test_signed_score_scalar_threshold_one_token(op, thr_kind):
    """DejaVu's case: the signed gate pre-activation against one calibrated threshold."""
    x, p = make(0, *SHAPES[0], torch.bfloat16, seed=len(op) + len(thr_kind))

    def thr_of(score):
        value = threshold_for(score, 0.6)
        return torch.tensor([value], device=DEVICE) if thr_kind == "tensor" else value

    out, ref, score = run_op(op, x, p, thr_of)
    assert rel_err(out, ref) <= 1e-2
    assert not torch.equal(score > thr_of(score), score.abs() > thr_of(score))  # signed is not |score|


BATCHES = (2, 3, 5, 16)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("op", ["cats_fused", "dejavu", "dejavu_fused", "coefficient", "sparse_down", "predicted"])
def test_vector_threshold_batch(op, batch):
    hidden, inter = SHAPES[-1]
    x, p = make(batch, hidden, inter, torch.bfloat16, seed=batch * 7 + len(op))
    out, ref, score = run_op(op, x, p, lambda s: vector_threshold(s, 0.7, seed=batch), seed=batch)
    assert out.shape == (batch, hidden) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= tol(torch.bfloat16)


@pytest.mark.parametrize("batch", BATCHES)
def test_signed_score_batch(batch):
    hidden, inter = SHAPES[-1]
    x, p = make(batch, hidden, inter, torch.bfloat16, seed=batch + 50)
    out, ref, score = run_op("dejavu_fused", x, p, lambda s: torch.tensor([threshold_for(s, 0.7)], device=DEVICE))
    assert rel_err(out, ref) <= tol(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("op", ["mcd_signed", "signed_act_fused", "coefficient"])
def test_vector_threshold_batch_dtypes(op, dtype):
    x, p = make(3, *SHAPES[-1], dtype, seed=len(op))
    out, ref, _ = run_op(op, x, p, lambda s: vector_threshold(s, 0.5, seed=4))
    assert rel_err(out, ref) <= tol(dtype)


def test_batch_equals_each_token_alone_with_vector_threshold():
    x, p = make(3, *SHAPES[-1], torch.float32, seed=9)
    g = _proj(x, p.w_gate)
    thr = vector_threshold(reference.activation(g, "silu").abs(), 0.8, seed=2)
    y = kernels.fused_gather_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr)
    for b in range(3):
        alone = kernels.fused_gather_ffn(x[b], p.w_gate, p.w_up, p.w_down_t, thr)  # the batch-1 kernel
        assert rel_err(y[b], alone) <= tol(torch.float32)


def test_infinite_thresholds_keep_nothing_or_everything():
    hidden, inter = SMALL
    for batch in (0, 3):
        x, p = make(batch, hidden, inter, torch.float32, seed=5)
        never = torch.full((inter,), math.inf, device=DEVICE)
        for fn in (lambda thr: kernels.coefficient_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr),
                   lambda thr: kernels.fused_gather_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr, score_act=False,
                                                        signed=True)):
            y = fn(never)
            assert torch.equal(y, torch.zeros_like(y))
            dense = reference.dense_ffn(x, p.w_gate, p.w_up, p.w_down_t)
            assert rel_err(fn(-never), dense) <= tol(torch.float32)


# launch configurations with a threshold vector: the shipped split, the pipelined gathers, the interleaved
# phases; the batched kernels' splits and tiles
CORE_CONFIGS = {"base": {}, "pipe": dict(pipe=True, block_i=2), "interleave": dict(interleave=True, block_d=2)}


CORE_PATHS = {"gate-signed": (_core.KIND_GATE, False, True), "gate-fused": (_core.KIND_GATE, True, False),
              "t-fused": (_core.KIND_T, True, False)}
CORE_CASES = [("gate-signed", "base"), ("gate-signed", "pipe"), ("gate-fused", "interleave"),
              ("gate-fused", "pipe"), ("t-fused", "pipe")]


@pytest.mark.parametrize("path,config", CORE_CASES, ids=[f"{p}-{c}" for p, c in CORE_CASES])
def test_core_launch_configs_with_vector_threshold(path, config):
    kind, compute, signed = CORE_PATHS[path]
    hidden, inter = SMALL
    cfg = dataclasses.replace(_core.pick_config(kind, compute, hidden, inter, DEVICE), **CORE_CONFIGS[config])
    x, p = make(0, hidden, inter, torch.bfloat16, seed=len(config) + kind)
    op = "dejavu" if signed else ("cats_fused" if kind == _core.KIND_GATE else "coefficient")
    _, ref, score = run_op(op, x, p, lambda s: vector_threshold(s, 0.6, seed=kind))
    thr = vector_threshold(score, 0.6, seed=kind)
    vec = _proj(x, p.w_gate).to(x.dtype)
    for _ in range(2):  # a persistent workspace must be left zero
        out = torch.full((hidden,), float("nan"), dtype=x.dtype, device=DEVICE)
        y = _core.launch(kind, compute, x, vec, p.w_gate, p.w_up, p.w_down_t, thr, 0.0, "silu",
                         kind == _core.KIND_GATE and not signed, x.dtype, config=cfg, out=out, signed=signed)
        assert rel_err(y, ref) <= 1e-2


BATCH_CONFIGS = {"many_splits": dict(down_programs=64, block_n=16, h_tile=16),
                 "big_blocks": dict(block_i=32, block_k=32, h_tile=64, block_n=32)}


BATCH_CASES = [("sparse_down", "many_splits"), ("sparse_down", "big_blocks"), ("dejavu_fused", "many_splits")]


@pytest.mark.parametrize("op,config", BATCH_CASES, ids=[f"{o}-{c}" for o, c in BATCH_CASES])
def test_batch_launch_configs_with_vector_threshold(op, config):
    cfg = dataclasses.replace(batch_ffn.pick_config(DEVICE), **BATCH_CONFIGS[config])
    batch, (hidden, inter) = 5, SMALL
    x, p = make(batch, hidden, inter, torch.bfloat16, seed=len(config))
    _, ref, score = run_op(op, x, p, lambda s: vector_threshold(s, 0.6, seed=1))
    thr = vector_threshold(score, 0.6, seed=1)
    t = reference.activation(_proj(x, p.w_gate), "silu") * _proj(x, p.w_up)
    kind, compute = (_core.KIND_T, False) if op == "sparse_down" else (_core.KIND_GATE, True)
    for _ in range(2):
        out = torch.full((batch, hidden), float("nan"), dtype=x.dtype, device=DEVICE)
        y = batch_ffn.launch(kind, compute, None if op == "sparse_down" else x, t, p.w_gate, p.w_up, p.w_down_t,
                             thr, 0.0, "silu", False, config=cfg, out=out, signed=op != "sparse_down")
        assert rel_err(y, ref) <= 1e-2


def test_bad_threshold_vectors_are_refused_with_the_reason():
    hidden, inter = SMALL
    x, p = make(0, hidden, inter, torch.float32, seed=1)

    def call(thr, **kw):
        return kernels.fused_gather_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr, **kw)

    good = torch.rand(inter, device=DEVICE)
    with pytest.raises(ValueError, match=rf"one per neuron \(shape \[{inter}\]\)"):
        call(good[:-1])
    with pytest.raises(ValueError, match="one per neuron"):
        call(good.reshape(1, inter))
    with pytest.raises(ValueError, match="contiguous float32"):
        call(good.double())
    with pytest.raises(ValueError, match="contiguous float32"):
        call(torch.rand(2 * inter, device=DEVICE)[::2])
    with pytest.raises(TypeError, match="floating point"):
        call(torch.ones(inter, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="signed must be a bool"):
        call(0.1, signed=1)
    with pytest.raises(ValueError, match="one value"):  # the input-sparse GEMV scales scores instead
        kernels.input_sparse_linear(x, p.w_up.t().contiguous(), torch.rand(hidden, device=DEVICE))
    with pytest.raises(ValueError, match="one per entry"):
        reference.sparse_down(torch.randn(inter), p.w_down_t.cpu(), torch.rand(inter - 1))
    if ON_GPU:
        with pytest.raises(ValueError, match="threshold is on"):
            call(good.cpu())
