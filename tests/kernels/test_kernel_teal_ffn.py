"""input_sparse_ffn (TEAL's whole FFN in one launch for one token) against the pure-torch reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernel_cases import DEVICE, ON_GPU, kernels, reference, rel_err, threshold_for, tol

from countdown.kernels import _core
from countdown.kernels import teal_ffn as isf


@pytest.fixture(autouse=True)
def one_launch(monkeypatch):
    """The one-launch kernel for one token, whatever the shipped default of the switch."""
    monkeypatch.setattr(isf, "FUSE", True)

# (H, I): odd sizes in the interpreter (H not a multiple of 16, I not of 8); model shapes on a GPU
SHAPES = [(576, 1536), (4096, 14336), (3584, 18944)] if ON_GPU else [(72, 203), (40, 136)]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (input sparsity, coefficient sparsity); 1.0: nothing kept at that site
SPARSITIES = ((0.0, 0.0), (0.5, 0.5), (0.4, 0.8), (1.0, 0.5), (0.5, 1.0))


def make(hidden: int, inter: int, dtype: torch.dtype, seed: int, batch: int = 1):
    """Fresh random non-zero x [B, H], input-major W_gate^T, W_up^T [H, I] and W_down^T [I, H]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, hidden, generator=g)
    x = x + torch.where(x >= 0, 0.01, -0.01)
    wg, wu = (torch.randn(hidden, inter, generator=g) / hidden**0.5 for _ in range(2))
    wd = torch.randn(inter, hidden, generator=g) / inter**0.5
    to = dict(device=DEVICE, dtype=dtype)
    return x.to(**to), wg.to(**to), wu.to(**to), wd.to(**to)


def thresholds(x, wg, wu, s_in: float, s_co: float, act: str = "silu") -> tuple[float, float]:
    """Midpoint thresholds (no neuron sits on one) dropping s_in of |x| and s_co of |t|."""
    thr_in = threshold_for(x.float().abs(), s_in)
    xk = torch.where(x.float().abs() > thr_in, x.float(), 0.0)
    t = reference.activation(xk @ wg.float(), act) * (xk @ wu.float())
    return thr_in, threshold_for(t.abs(), s_co)


def run(x, w_in, wd, thr_in, thr_co, act="silu", config=None):
    """The kernel itself (not the op's dispatch), so a launch configuration can be given."""
    t_in, v_in = kernels.pack.check_threshold(thr_in, x.device)
    t_co, v_co = kernels.pack.check_threshold(thr_co, x.device)
    return isf._launch(x.reshape(-1).contiguous(), *isf._split_in(w_in), wd, t_in, v_in, t_co, v_co, act,
                       config=config).reshape(x.shape)


def wina_scales(wg, wd):
    """WINA's channel scales: column norms of W_gate (over its outputs) and of W_down, fp32."""
    return wg.float().norm(dim=1).contiguous(), wd.float().norm(dim=1).contiguous()


@pytest.mark.parametrize("hidden,inter", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("s_in,s_co", SPARSITIES)
def test_matches_reference(hidden, inter, dtype, s_in, s_co):
    if not ON_GPU and (hidden, inter) != SHAPES[0] and dtype == torch.bfloat16:
        pytest.skip("the interpreter covers bf16 on the first shape")
    x, wg, wu, wd = make(hidden, inter, dtype, seed=hidden + inter + int(10 * s_in))
    thr_in, thr_co = thresholds(x, wg, wu, s_in, s_co)
    out = kernels.input_sparse_ffn(x, [wg, wu], wd, thr_in, thr_co)
    ref = reference.input_sparse_ffn(x, [wg, wu], wd, thr_in, thr_co)
    if s_in == 1.0 or s_co == 1.0:
        assert torch.equal(out, torch.zeros_like(out))
    else:
        assert rel_err(out, ref) <= tol(dtype)


def test_fused_gate_up_layout_and_gelu():
    hidden, inter = SHAPES[0]
    x, wg, wu, wd = make(hidden, inter, torch.bfloat16, seed=3)
    thr_in, thr_co = thresholds(x, wg, wu, 0.5, 0.6, act="gelu_tanh")
    gate_up = torch.cat([wg, wu], dim=1).contiguous()  # [H, 2I], as a model with a fused gate_up_proj
    out = kernels.input_sparse_ffn(x, [gate_up], wd, thr_in, thr_co, act="gelu_tanh")
    ref = reference.input_sparse_ffn(x, [wg, wu], wd, thr_in, thr_co, act="gelu_tanh")
    assert rel_err(out, ref) <= 1e-2
    assert torch.equal(out, kernels.input_sparse_ffn(x, [wg, wu], wd, thr_in, thr_co, act="gelu_tanh"))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_wina_channel_scales(batch, dtype):
    hidden, inter = SHAPES[0]
    x, wg, wu, wd = make(hidden, inter, dtype, seed=21 + batch, batch=batch)
    scales = wina_scales(wg, wd)
    thr_in = threshold_for(x.float().abs() * scales[0], 0.5)
    xk = torch.where(x.float().abs() * scales[0] > thr_in, x.float(), 0.0)
    t = reference.activation(xk @ wg.float(), "silu") * (xk @ wu.float())
    thr_co = threshold_for(t.abs() * scales[1], 0.6)
    out = kernels.input_sparse_ffn(x, [wg, wu], wd, thr_in, thr_co, channel_scales=scales)
    ref = reference.input_sparse_ffn(x, [wg, wu], wd, thr_in, thr_co, channel_scales=scales)
    assert rel_err(out, ref) <= (tol(dtype) if batch == 1 else 5e-2)  # 3 tokens: t rounded to x's dtype first
    teal = reference.input_sparse_ffn(x, [wg, wu], wd, thr_in, thr_co)
    assert rel_err(out, teal) > 10 * tol(dtype)  # the scales changed which channels were kept


CONFIGS = [isf.FfnConfig(programs_per_sm=p, block_k=bk, num_stages=st, num_warps=4, block_i=bi, chunk=ch, pipe=pi)
           for p, bk, st, bi, ch, pi in [(1, 16, 1, 4, 16, False), (5, 32, 2, 2, 32, True), (2, 64, 3, 4, 64, False)]]
if ON_GPU:
    CONFIGS = [dataclasses.replace(c, programs_per_sm=min(c.programs_per_sm, 2), num_warps=8, chunk=128)
               for c in CONFIGS]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"p{c.programs_per_sm}-k{c.block_k}-pipe{int(c.pipe)}")
def test_launch_configurations(config):
    hidden, inter = SHAPES[0]
    x, wg, wu, wd = make(hidden, inter, torch.float32, seed=11)
    thr_in, thr_co = thresholds(x, wg, wu, 0.5, 0.5)
    out = run(x, [wg, wu], wd, thr_in, thr_co, config=config)
    assert rel_err(out, reference.input_sparse_ffn(x, [wg, wu], wd, thr_in, thr_co)) <= 1e-4


def test_threshold_tensors_and_workspace_left_zero():
    hidden, inter = SHAPES[0]
    x, wg, wu, wd = make(hidden, inter, torch.float16, seed=5)
    thr_in, thr_co = thresholds(x, wg, wu, 0.5, 0.5)
    t_in = torch.tensor([thr_in], device=DEVICE)
    t_co = torch.tensor([thr_co], device=DEVICE)
    first = kernels.input_sparse_ffn(x, [wg, wu], wd, t_in, t_co)
    assert rel_err(first, reference.input_sparse_ffn(x, [wg, wu], wd, thr_in, thr_co)) <= tol(torch.float16)
    assert torch.count_nonzero(_core._persistent_workspace(x.device, hidden + 1)) == 0
    t_co.fill_(1e30)  # the tensor is read at launch: nothing kept at the coefficients now
    assert torch.equal(kernels.input_sparse_ffn(x, [wg, wu], wd, t_in, t_co), torch.zeros_like(first))


@pytest.mark.parametrize("batch", [2, 3, 16])
def test_several_tokens_take_the_three_launch_path(batch):
    hidden, inter = SHAPES[0]
    x, wg, wu, wd = make(hidden, inter, torch.float32, seed=batch, batch=batch)
    thr_in = threshold_for(x.abs(), 0.5)
    out = kernels.input_sparse_ffn(x, [wg, wu], wd, thr_in, 0.05)
    assert rel_err(out, reference.input_sparse_ffn(x, [wg, wu], wd, thr_in, 0.05)) <= 1e-4


def test_switch_off_gives_the_three_launch_result(monkeypatch):
    hidden, inter = SHAPES[0]
    x, wg, wu, wd = make(hidden, inter, torch.float32, seed=8)
    thr_in, thr_co = thresholds(x, wg, wu, 0.5, 0.5)
    fused = kernels.input_sparse_ffn(x, [wg, wu], wd, thr_in, thr_co)
    monkeypatch.setattr(isf, "FUSE", False)
    three = kernels.input_sparse_ffn(x, [wg, wu], wd, thr_in, thr_co)
    assert rel_err(fused, three) <= 1e-4


def test_bad_input_is_named():
    hidden, inter = SHAPES[0]
    x, wg, wu, wd = make(hidden, inter, torch.float32, seed=1)
    with pytest.raises(ValueError, match="activation"):
        kernels.input_sparse_ffn(x, [wg, wu], wd, 0.1, 0.1, act="swish")
    with pytest.raises(TypeError, match="must both be floats"):
        kernels.input_sparse_ffn(x, [wg, wu], wd, torch.tensor([0.1], device=DEVICE), 0.1)
    assert "one" in isf.input_sparse_ffn_unavailable_reason(x.expand(2, hidden), [wg, wu], wd)
    assert "[" in isf.input_sparse_ffn_unavailable_reason(x, [wg.t(), wu], wd)
    assert "dtype" in isf.input_sparse_ffn_unavailable_reason(x.half(), [wg, wu], wd)
    with pytest.raises(ValueError, match="s_coef must be a contiguous"):
        kernels.input_sparse_ffn(x, [wg, wu], wd, 0.1, 0.1, channel_scales=(wina_scales(wg, wd)[0], wg[:, 0].float()))
    with pytest.raises(TypeError, match="s_in must be a float32"):
        kernels.input_sparse_ffn(x, [wg, wu], wd, 0.1, 0.1, channel_scales=(x.half(), wina_scales(wg, wd)[1]))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_with_new_thresholds():
    hidden, inter = 4096, 14336
    x, wg, wu, wd = make(hidden, inter, torch.bfloat16, seed=2)
    thr_in, thr_co = thresholds(x, wg, wu, 0.5, 0.5)
    t_in = torch.tensor([thr_in], device=DEVICE)
    t_co = torch.tensor([thr_co], device=DEVICE)
    kernels.input_sparse_ffn(x, [wg, wu], wd, t_in, t_co)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.input_sparse_ffn(x, [wg, wu], wd, t_in, t_co)
    for s_in, s_co in ((0.5, 0.5), (0.7, 0.9), (0.2, 0.3)):
        a, b = thresholds(x, wg, wu, s_in, s_co)
        t_in.fill_(a)
        t_co.fill_(b)
        graph.replay()
        assert rel_err(out, reference.input_sparse_ffn(x, [wg, wu], wd, a, b)) <= 1e-2


def test_opcheck():
    hidden, inter = SHAPES[0]
    x, wg, wu, wd = make(hidden, inter, torch.float32, seed=4)
    t = torch.tensor([0.3], device=DEVICE)
    for scales in (None, wina_scales(wg, wd)):
        torch.library.opcheck(isf._op, (x.reshape(-1), wg, wu, wd, t, 0.0, t, 0.0, "silu", *(scales or (None, None))),
                              test_utils=("test_schema", "test_faketensor"))
