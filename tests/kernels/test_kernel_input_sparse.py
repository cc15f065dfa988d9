"""input_sparse_linear (TEAL / WINA input-channel sparsity) against the pure-torch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_cases import DEVICE, ON_GPU, reference, rel_err, threshold_for, tol

from countdown import KernelPolicy
from countdown.kernels import _runtime
from countdown.kernels import input_sparse_checks as isp_checks
from countdown.kernels import input_sparse as isp

# (K, N): odd, not multiples of 16; on a GPU also a Llama-3-8B-like fused-qkv width
SHAPES = [(4096, 6144), (1000, 333)] if ON_GPU else [(77, 45), (50, 131)]
BATCHES = (1, 2, 5, 16)


def make(batch: int, k: int, n: int, dtype: torch.dtype, seed: int):
    """Fresh random non-zero tokens [B, K], w_t [K, N] and a WINA channel scale [K] (fp32)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, k, generator=g)
    w_t = torch.randn(k, n, generator=g) / k**0.5
    scale = torch.rand(k, generator=g) + 0.25
    return x.to(DEVICE, dtype), w_t.to(DEVICE, dtype), scale.to(DEVICE)


def score_of(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    s = x.float().abs()
    return s if scale is None else s * scale


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("wina", [False, True], ids=["teal", "wina"])
def test_matches_reference_bf16(batch, wina):
    k, n = SHAPES[0]
    x, w_t, scale = make(batch, k, n, torch.bfloat16, seed=batch + 100 * wina)
    scale = scale if wina else None
    thr = threshold_for(score_of(x, scale), 0.5)
    ref = reference.input_sparse_linear(x, w_t, thr, channel_scale=scale)
    out = torch.full((batch, n), float("nan"), dtype=x.dtype, device=DEVICE)  # every element must be written
    assert isp._launch(x, w_t, scale, None, thr, out) is out  # the walk kernel, at every batch size
    assert rel_err(out, ref) <= tol(x.dtype)
    y = isp.input_sparse_linear(x, w_t, thr, channel_scale=scale)  # the policy's choice (batch 1: prefetch)
    assert rel_err(y, ref) <= tol(x.dtype)


@pytest.mark.parametrize("dtype,batch,sparsity", [(torch.float16, 3, 0.25), (torch.float32, 1, 0.7),
                                                  (torch.float32, 16, 0.9)])
def test_other_dtypes_and_threshold_tensor(dtype, batch, sparsity):
    k, n = SHAPES[1]
    x, w_t, scale = make(batch, k, n, dtype, seed=7)
    thr = torch.tensor([threshold_for(score_of(x, scale), sparsity)], device=DEVICE)
    y = isp.input_sparse_linear(x, w_t, thr, channel_scale=scale)
    assert y.shape == (batch, n) and y.dtype == dtype
    assert rel_err(y, reference.input_sparse_linear(x, w_t, thr, channel_scale=scale)) <= tol(dtype)


CONFIGS = {
    "masked-dot-split": isp.InputSparseConfig(block_n=16, block_k=16, num_stages=1, programs_per_sm=8),
    "masked-dot-nosplit": isp.InputSparseConfig(block_n=32, block_k=16, num_stages=1, programs_per_sm=1),
    "block_k8-split": isp.InputSparseConfig(block_n=32, block_k=8, num_stages=1, programs_per_sm=8),
}
if ON_GPU:  # the shapes are larger there: scale the tiles too
    CONFIGS = {name: isp.InputSparseConfig(**{**vars(c), "block_n": 8 * c.block_n, "programs_per_sm": 2})
               for name, c in CONFIGS.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 5])
def test_launch_configurations(name, batch):
    """Every way of walking the channels and reducing gives the reference; every output is written."""
    k, n = SHAPES[1]
    x, w_t, scale = make(batch, k, n, torch.bfloat16, seed=11 * batch)
    thr = threshold_for(score_of(x, scale), 0.6)
    out = torch.full((batch, n), float("nan"), dtype=x.dtype, device=DEVICE)
    isp._launch(x, w_t, scale, None, thr, out, CONFIGS[name])
    assert rel_err(out, reference.input_sparse_linear(x, w_t, thr, channel_scale=scale)) <= 1e-2


def test_each_token_has_its_own_mask():
    """Tokens keep disjoint channel sets: a batch's rows equal the tokens run one by one, and a token
    that keeps nothing gives exact zeros although the others' rows are read."""
    k, n = SHAPES[1]
    x, w_t, _ = make(3, k, n, torch.float32, seed=5)
    mag = torch.full((3, k), 0.1, device=DEVICE)
    mag[0, : k // 2] = 2.0   # token 0 keeps the first half
    mag[1, k // 2:] = 2.0    # token 1 the second half; token 2 nothing
    x = (x.sign() + (x == 0).float()) * mag * (1 + torch.rand(3, k, device=DEVICE))
    y = isp.input_sparse_linear(x, w_t, 1.0)
    for b in range(3):
        alone = isp.input_sparse_linear(x[b], w_t, 1.0)
        assert torch.allclose(y[b], alone, rtol=1e-5, atol=1e-6)
    assert torch.equal(y[2], torch.zeros_like(y[2]))
    assert rel_err(y, reference.input_sparse_linear(x, w_t, 1.0)) <= 1e-5


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("thr", [0.0, -1.0])
def test_sparsity_zero_is_the_dense_linear(batch, thr):
    """Nothing dropped (x has no zeros; threshold 0 or below every score): y = x @ W^T."""
    k, n = SHAPES[0]
    x, w_t, _ = make(batch, k, n, torch.bfloat16, seed=3)
    assert bool((x != 0).all())
    y = isp.input_sparse_linear(x.unsqueeze(1), w_t, thr)  # [B, 1, K] decode shape
    assert y.shape == (batch, 1, n)
    dense = F.linear(x.float(), w_t.t().float()).to(x.dtype)  # the nn.Linear view of the one copy
    assert rel_err(y.squeeze(1), dense) <= 1e-2


@pytest.mark.parametrize("variant", ["walk", "prefetch"])
def test_vector_input_and_workspace_left_zero(variant):
    k, n = SHAPES[1]
    x, w_t, _ = make(1, k, n, torch.bfloat16, seed=9)
    thr = threshold_for(x.abs(), 0.5)
    policy = KernelPolicy(input_sparse=variant)
    first = isp.input_sparse_linear(x[0], w_t, thr, policy=policy)
    assert first.shape == (n,)
    again = isp.input_sparse_linear(x[0], w_t, thr, policy=policy)
    assert torch.equal(again, first) or rel_err(again, first) <= 1e-6  # fp32 atomics: arrival order
    extra = 0 if variant == "walk" else 3  # the prefetch kernel's tickets: one more per weight it may serve
    ws = _runtime.persistent_workspace(w_t.device, isp.MAX_BATCH * n + (n + 15) // 16 + extra)
    assert int(ws.count_nonzero()) == 0


def test_bad_inputs():
    k, n = SHAPES[1]
    x, w_t, scale = make(2, k, n, torch.bfloat16, seed=1)
    cases = [
        ((x.float(), w_t), TypeError, "dtypes"),
        ((x.to(torch.int32), w_t.to(torch.int32)), TypeError, "dtypes"),
        ((x[:, :-1], w_t), ValueError, "last dimension"),
        ((x.expand(2, k).repeat(9, 1), w_t), ValueError, "18 tokens"),
        ((x, w_t.t().contiguous().t()), ValueError, "contiguous"),
        ((x, w_t[0]), ValueError, "2-D"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            isp.input_sparse_linear(*args, 0.1)
        assert msg.split()[0] in isp.input_sparse_unavailable_reason(*args)
    with pytest.raises(TypeError, match="float32"):
        isp.input_sparse_linear(x, w_t, 0.1, channel_scale=scale.half())
    with pytest.raises(ValueError, match="channel_scale must have shape"):
        isp.input_sparse_linear(x, w_t, 0.1, channel_scale=scale[:-1])
    with pytest.raises(TypeError, match="threshold must be"):
        isp.input_sparse_linear(x, w_t, "0.1")
    with pytest.raises(ValueError, match="one value"):
        isp.input_sparse_linear(x, w_t, torch.zeros(2, device=DEVICE))
    assert isp.input_sparse_unavailable_reason(x, w_t, scale) is None


def test_reason_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.setattr(isp_checks, "interpret_mode", lambda: False)
    x, w_t, _ = make(1, 8, 4, torch.float32, seed=0)
    reason = isp.input_sparse_unavailable_reason(x.cpu(), w_t.cpu())
    assert reason is not None and "CUDA" in reason


def test_opcheck_and_compile():
    """Registered ops with correct fake kernels; torch.compile(fullgraph) traces both entry points."""
    k, n = SHAPES[1]
    x, w_t, scale = make(2, k, n, torch.bfloat16, seed=2)
    thr = torch.tensor([threshold_for(score_of(x, scale), 0.5)], device=DEVICE)
    torch.library.opcheck(torch.ops.countdown.input_sparse_linear.default, (x, w_t, scale, thr, 0.0),
                          test_utils=("test_schema", "test_faketensor"))

    def f(x, thr):
        return isp.input_sparse_linear(x, w_t, thr, channel_scale=scale) * 2

    backend = "inductor" if ON_GPU else "aot_eager"
    y = torch.compile(f, backend=backend, fullgraph=True)(x, thr)
    assert rel_err(y, 2 * reference.input_sparse_linear(x, w_t, thr, channel_scale=scale)) <= 1e-2


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_with_threshold_tensor():
    k, n = SHAPES[0]
    x, w_t, _ = make(4, k, n, torch.bfloat16, seed=4)
    thr = torch.zeros(1, device=DEVICE)
    isp.input_sparse_linear(x, w_t, thr)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = isp.input_sparse_linear(x, w_t, thr)
    for s in (0.0, 0.5, 0.9):
        x.copy_(torch.randn_like(x))
        thr.fill_(threshold_for(x.abs(), s))
        graph.replay()
        assert rel_err(y, reference.input_sparse_linear(x, w_t, thr)) <= 1e-2
