"""The prefetch variant of the input-sparse GEMV and its one-launch q/k/v entry, against the reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernel_cases import DEVICE, ON_GPU, reference, rel_err, threshold_for, tol

from countdown import KernelPolicy
from countdown.kernels import _runtime
from countdown.kernels import input_sparse as isp
from countdown.kernels import input_sparse_prefetch as pf

K, N = (4096, 1000) if ON_GPU else (77, 45)  # odd, not multiples of 16
KV = (4096, 1000, 264, 264) if ON_GPU else (53, 45, 13, 29)  # K, then three widths (q, k, v-like)
BATCHES = (1, 2, 3, 16)

# the same kernel walked every way: split with atomics / one program per tile (direct store), several
# tile sizes, and a prologue in several chunks (B > 1, long range)
CONFIGS = {
    "split": pf.PrefetchConfig(block_n=16, block_k=16, num_stages=2, programs_per_sm=4, min_kpp=16),
    "split-bk32": pf.PrefetchConfig(block_n=32, block_k=32, num_stages=1, programs_per_sm=4, min_kpp=16),
    "whole-k": pf.PrefetchConfig(block_n=16, block_k=16, num_stages=1, min_kpp=16, max_split=1),
    "whole-k-bn64": pf.PrefetchConfig(block_n=64, block_k=16, num_stages=1, min_kpp=16, max_split=1),
    "wide-k64": pf.PrefetchConfig(block_n=16, block_k=64, num_stages=3, programs_per_sm=4, min_kpp=64),
}
if ON_GPU:  # larger shapes there: wider tiles, about as many programs per SM as the shipped config
    CONFIGS = {name: pf.PrefetchConfig(**{**vars(c), "block_n": 4 * c.block_n, "min_kpp": 128,
                                          "programs_per_sm": 2 * c.programs_per_sm})
               for name, c in CONFIGS.items()}


def make(batch: int, k: int, ns: tuple[int, ...], dtype: torch.dtype, seed: int):
    """Fresh random non-zero tokens [B, K], weights [K, N_i] and WINA channel scales [K] (fp32)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, k, generator=g)
    x = x + torch.where(x >= 0, 0.01, -0.01)  # no zeros: "100% kept" at threshold 0 means every channel
    ws = [(torch.randn(k, n, generator=g) / k**0.5).to(DEVICE, dtype) for n in ns]
    scales = [(torch.rand(k, generator=g) + 0.25).to(DEVICE) for _ in ns]
    return x.to(DEVICE, dtype), ws, scales


def threshold(x: torch.Tensor, scale: torch.Tensor | None, kept: str) -> float:
    score = x.float().abs() if scale is None else x.float().abs() * scale
    return {"none": 1e30, "half": threshold_for(score, 0.5), "all": 0.0}[kept]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("kept", ["none", "half", "all"])
@pytest.mark.parametrize("wina", [False, True], ids=["teal", "wina"])
def test_every_configuration_matches_reference(batch, kept, wina):
    dtype = torch.bfloat16 if batch % 2 else torch.float32
    x, (w_t,), (scale,) = make(batch, K, (N,), dtype, seed=batch + 10 * wina)
    scale = scale if wina else None
    thr = threshold(x, scale, kept)
    ref = reference.input_sparse_linear(x, w_t, thr, channel_scale=scale)
    for name, cfg in CONFIGS.items():
        out = torch.full((batch, N), float("nan"), dtype=dtype, device=DEVICE)
        (y,) = pf.input_sparse_multi(x, [w_t], [thr], channel_scales=[scale], outs=[out], config=cfg)
        assert y is out
        if kept == "none":
            assert torch.equal(y, torch.zeros_like(y)), name
        else:
            assert rel_err(y, ref) <= tol(dtype), name


@pytest.mark.parametrize("name", ["whole-k", "whole-k-bn64"])
def test_long_range_prologue_in_chunks(name):
    """B > 1 and one program over many channels: the keep words are built in several prologue chunks."""
    k = 4096 if ON_GPU else 300
    cfg = CONFIGS[name]
    x, (w_t,), (scale,) = make(3, k, (33,), torch.float32, seed=21)
    _, split, kpp = pf.grid(cfg, k, [33], x.device, batch=3)
    assert split == 1 and kpp // cfg.block_k > pf._prologue_steps(3, cfg.block_k)
    thr = threshold(x, scale, "half")
    (y,) = pf.input_sparse_multi(x, [w_t], [thr], channel_scales=[scale], config=cfg)
    assert rel_err(y, reference.input_sparse_linear(x, w_t, thr, channel_scale=scale)) <= 1e-4


def test_wide_weights_get_the_wide_config():
    """The summed width picks the tiles (gate + up in one launch: 64-channel steps)."""
    cuda = torch.device("cuda")
    assert pf.pick_config(1, 4096, 2 * 14336, cuda) == pf._WIDE_CONFIG
    assert pf.pick_config(1, 4096, 4096 + 2 * 1024, cuda) == pf._GPU_CONFIG
    assert pf._WIDE_CONFIG.block_k == 64 and pf.WIDE_N < 2 * 14336
    assert pf.pick_config(1, 4096, 2 * 14336, torch.device("cpu")) == pf._INTERPRET_CONFIG


def test_grid_sizes_the_split_from_n(monkeypatch):
    """Narrow N: fewer, longer programs (min_kpp); N tiles that fill the GPU alone: no split at all."""
    cfg = pf.PrefetchConfig(block_n=256, block_k=32, programs_per_sm=2, min_kpp=128)
    cuda = torch.device("cuda")
    monkeypatch.setattr(_runtime, "num_sms", lambda device: 132)  # an H100
    assert pf.grid(cfg, 4096, [4096], cuda) == (16, 16, 256)
    assert pf.grid(cfg, 4096, [1024], cuda) == (4, 32, 128)  # the walk kernel: 64 splits of 64
    assert pf.grid(cfg, 4096, [4096, 1024, 1024], cuda) == (24, 11, 384)
    assert pf.grid(cfg, 4096, [300 * 256], cuda) == (300, 1, 4096)
    whole = dataclasses.replace(cfg, block_n=32, block_k=64, max_split=1)
    assert pf.grid(whole, 4096, [4096], cuda) == (128, 1, 4096)
    assert pf.grid(whole, 14336, [4096], cuda, batch=1) == (128, 1, 14336)
    assert pf.grid(whole, 14336, [4096], cuda, batch=16) == (128, 4, 3584)  # prologue <= 16 chunks


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("wina", [False, True], ids=["teal", "wina"])
def test_multi_is_each_weight_alone(batch, wina):
    """q, k, v in one launch: each output equals the reference with its own threshold and scale."""
    k, *ns = KV
    x, ws, scales = make(batch, k, tuple(ns), torch.float32, seed=50 + batch)
    scales = scales if wina else [None] * 3
    thrs = [threshold(x, s, "half") * f for s, f in zip(scales, (1.0, 0.6, 1.4))]
    thr_t = [torch.tensor([t], device=DEVICE) for t in thrs]
    for name in ("split", "whole-k-bn64"):
        outs = [torch.full((batch, n), float("nan"), device=DEVICE) for n in ns]
        got = pf.input_sparse_multi(x.unsqueeze(1), ws, thr_t, channel_scales=scales, outs=outs,
                                    config=CONFIGS[name])
        assert all(g is o for g, o in zip(got, outs))
        for y, w_t, t, s in zip(got, ws, thrs, scales):
            assert rel_err(y, reference.input_sparse_linear(x, w_t, t, channel_scale=s)) <= 1e-4, name
    ys = pf.input_sparse_multi(x.unsqueeze(1), ws, thrs, channel_scales=scales)  # floats, shipped config
    for y, w_t, t, s in zip(ys, ws, thrs, scales):
        assert y.shape == (batch, 1, w_t.shape[1])
        assert rel_err(y.squeeze(1), reference.input_sparse_linear(x, w_t, t, channel_scale=s)) <= 1e-4


def test_multi_with_a_width_one_weight_and_workspace_left_zero():
    k, *ns = KV
    cfg = pf.PrefetchConfig(block_n=16, block_k=16, num_stages=1, programs_per_sm=64, min_kpp=16)
    x, ws, _ = make(2, k, tuple(ns), torch.float32, seed=3)
    thr = threshold(x, None, "half")
    for y, w_t in zip(pf.input_sparse_multi(x, ws, [thr] * 3, config=cfg), ws):
        assert rel_err(y, reference.input_sparse_linear(x, w_t, thr)) <= 1e-4
    assert pf.grid(cfg, k, ns, x.device)[1] > 1  # partial sums went through the workspace
    acc, tickets = pf._workspace(x.device, sum(ns))
    assert int(acc.count_nonzero()) == 0 and int(tickets.count_nonzero()) == 0
    x, ws, _ = make(2, k, (ns[0], 1, 7), torch.float32, seed=4)  # a width-1 weight runs on its own
    for y, w_t in zip(pf.input_sparse_multi(x, ws, [thr] * 3, config=cfg), ws):
        assert rel_err(y, reference.input_sparse_linear(x, w_t, thr)) <= 1e-4


def test_policy_variant_routes_the_public_op(monkeypatch):
    """KernelPolicy(input_sparse="prefetch"): input_sparse_linear runs the prefetch kernel (its registered op
    countdown::input_sparse_multi); "walk" the walk kernel (countdown::input_sparse_linear, walk only)."""
    x, (w_t,), _ = make(3, K, (N,), torch.bfloat16, seed=8)
    thr = torch.tensor([threshold(x, None, "half")], device=DEVICE)
    ref = reference.input_sparse_linear(x, w_t, thr)
    calls = []
    real = pf.launch
    monkeypatch.setattr(pf, "launch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert rel_err(isp.input_sparse_linear(x, w_t, thr, policy=KernelPolicy(input_sparse="prefetch")), ref) \
        <= tol(x.dtype) and len(calls) == 1
    y = torch.ops.countdown.input_sparse_linear(x, w_t, None, thr, 0.0)  # the walk kernel's op
    assert rel_err(y, ref) <= tol(x.dtype) and len(calls) == 1
    assert rel_err(isp.input_sparse_linear(x, w_t, thr, policy="always"), ref) <= tol(x.dtype) and len(calls) == 1
    # the default ("auto"): prefetch for one token, walk for more
    assert rel_err(isp.input_sparse_linear(x[:1], w_t, thr), ref[:1]) <= tol(x.dtype) and len(calls) == 2
    assert rel_err(isp.input_sparse_linear(x[:1], w_t, thr, policy=KernelPolicy(input_sparse="walk")),
                   ref[:1]) <= tol(x.dtype) and len(calls) == 2
    with pytest.raises(ValueError, match="input_sparse must be one of"):
        KernelPolicy(input_sparse="fast")


@pytest.mark.parametrize("wina", [False, True], ids=["teal", "wina"])
def test_linears_run_gate_and_up_as_one_launch_for_one_token(launches, monkeypatch, wina):
    """input_sparse_linears (TEAL/WINA's gate and up): one 2-weight launch for one token, one launch per
    weight for more tokens or with the policy's fuse_gate_up off; the same outputs either way."""
    k, *ns = KV
    for batch, fused in ((1, True), (3, False)):
        x, ws, scales = make(batch, k, tuple(ns[:2]), torch.bfloat16, seed=70 + batch)
        scale = scales[0] if wina else None
        thr = torch.tensor([threshold(x, scale, "half")], device=DEVICE)
        for on in (True, False):
            launches.clear()
            ys = isp.input_sparse_linears(x.unsqueeze(1), ws, thr, channel_scale=scale,
                                          policy=KernelPolicy(fuse_gate_up=on))
            for y, w_t in zip(ys, ws):
                assert y.shape == (batch, 1, w_t.shape[1])
                ref = reference.input_sparse_linear(x, w_t, thr, channel_scale=scale)
                assert rel_err(y.squeeze(1), ref) <= tol(x.dtype)
            assert launches == ([2] if fused and on else [1, 1] if batch == 1 else [])


def test_bad_inputs():
    k, *ns = KV
    x, ws, scales = make(2, k, tuple(ns), torch.float32, seed=1)
    with pytest.raises(ValueError, match="3 weights need as many thresholds"):
        pf.input_sparse_multi(x, ws, [0.1, 0.1])
    with pytest.raises(ValueError, match="list of 1 to 3 weights"):
        pf.input_sparse_multi(x, ws + ws[:1], [0.1] * 4)
    with pytest.raises(ValueError, match="weight 1: .*last dimension"):
        pf.input_sparse_multi(x, [ws[0], ws[1][:-1], ws[2]], [0.1] * 3)
    with pytest.raises(TypeError, match="all floats or all 1-element tensors"):
        pf.input_sparse_multi(x, ws, [0.1, torch.tensor([0.1], device=DEVICE), 0.1])
    with pytest.raises(ValueError, match="all None .* or all tensors"):
        pf.input_sparse_multi(x, ws, [0.1] * 3, channel_scales=[scales[0], None, None])
    with pytest.raises(ValueError, match="3 weights need 3 outs"):
        pf.input_sparse_multi(x, ws, [0.1] * 3, outs=[torch.empty(2, ns[0], device=DEVICE)])
    with pytest.raises(ValueError, match="block_k must be"):
        pf.PrefetchConfig(block_k=8)
