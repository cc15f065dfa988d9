"""The C++ CPU kernels (countdown.kernels.cpu) against countdown.kernels.reference on fresh random data:
odd sizes, batches 1/2/5/16, fp32 and bf16, empty and full kept sets; the fallback when the extension is
unavailable. The extension is built once per session (the first test pays for it; see its timing)."""

from __future__ import annotations

import time

import pytest
import torch

from countdown.kernels import cpu, reference

H, I = 577, 1539  # odd on purpose: tails of the SIMD loops
BATCHES = (1, 2, 5, 16)
DTYPES = (torch.float32, torch.bfloat16)
ACTS = ("silu", "gelu_tanh", "gelu", "relu")


@pytest.fixture(scope="module", autouse=True)
def built():
    t0 = time.perf_counter()
    reason = cpu.extension_reason()
    if reason is not None:
        pytest.skip(reason)
    print(f"\nCPU extension ready in {time.perf_counter() - t0:.1f} s (cached builds load in under a second)")


def _data(seed: int, b: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, H, generator=g).to(dtype)
    w_gate = (torch.randn(I, H, generator=g) / H**0.5).to(dtype)
    w_up = (torch.randn(I, H, generator=g) / H**0.5).to(dtype)
    w_down_t = (torch.randn(I, H, generator=g) / I**0.5).to(dtype)
    return x, w_gate, w_up, w_down_t


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", BATCHES)
def test_linear_equals_f_linear_in_both_layouts(b, dtype):
    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, 1, H, generator=g).to(dtype)
    w = torch.randn(I, H, generator=g).to(dtype)
    want = (x.float() @ w.float().t()).to(dtype)
    _close(cpu.linear(x, w), want, dtype)
    input_major = w.t().contiguous().t()  # same values, [H, I] storage (the TEAL kernel layout)
    _close(cpu.linear(x, input_major), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("case", ["cats", "m-countdown", "dejavu", "chess"])
def test_fused_gather_ffn_equals_reference(case, b, dtype):
    x, w_gate, w_up, w_down_t = _data(11 + b, b, dtype)
    dense = "up" if case == "m-countdown" else "gate"
    w_dense, w_sparse = (w_up, w_gate) if dense == "up" else (w_gate, w_up)
    kwargs = dict(dense=dense, signed=case == "dejavu", score_act=False if case == "dejavu" else None)
    a = (x.float() @ w_dense.float().t())
    score = {"cats": torch.nn.functional.silu(a).abs(), "m-countdown": a.abs(), "dejavu": a, "chess": a}[case]
    thr = reference.midpoint_threshold(score, 0.6)
    if case == "chess":  # a per-neuron threshold vector
        thr = torch.rand(I, generator=torch.Generator().manual_seed(b)) * 0.5
    want = reference.fused_gather_ffn(x, w_dense, w_sparse, w_down_t, thr, **kwargs)
    _close(cpu.fused_gather_ffn(x, w_dense, w_sparse, w_down_t, thr, **kwargs), want, dtype)


@pytest.mark.parametrize("act", ACTS)
def test_every_activation(act):
    x, w_gate, w_up, w_down_t = _data(5, 3, torch.float32)
    thr = torch.tensor([0.05])
    _close(cpu.fused_gather_ffn(x, w_gate, w_up, w_down_t, thr, act=act),
           reference.fused_gather_ffn(x, w_gate, w_up, w_down_t, thr, act=act), torch.float32)
    _close(cpu.coefficient_ffn(x, w_gate, w_up, w_down_t, 0.01, act=act),
           reference.coefficient_ffn(x, w_gate, w_up, w_down_t, 0.01, act=act), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", BATCHES)
def test_coefficient_and_predicted_ffn_equal_reference(b, dtype):
    x, w_gate, w_up, w_down_t = _data(23 + b, b, dtype)
    t = torch.nn.functional.silu(x.float() @ w_gate.float().t()) * (x.float() @ w_up.float().t())
    thr = reference.midpoint_threshold(t.abs(), 0.7)
    _close(cpu.coefficient_ffn(x, w_gate, w_up, w_down_t, thr),
           reference.coefficient_ffn(x, w_gate, w_up, w_down_t, thr), dtype)
    score = torch.randn(b, I, generator=torch.Generator().manual_seed(b)).to(dtype)
    _close(cpu.predicted_sparse_ffn(x, score, w_gate, w_up, w_down_t, 0.8),
           reference.predicted_sparse_ffn(x, score, w_gate, w_up, w_down_t, 0.8), dtype)
    keep = score > 0
    _close(cpu.predicted_sparse_ffn(x, keep, w_gate, w_up, w_down_t, 0.0),
           reference.predicted_sparse_ffn(x, keep, w_gate, w_up, w_down_t, 0.0), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", BATCHES)
def test_input_sparse_linear_and_sparse_down_equal_reference(b, dtype):
    g = torch.Generator().manual_seed(31 + b)
    x = torch.randn(b, 1, I, generator=g).to(dtype)
    w_t = (torch.randn(I, H, generator=g) / I**0.5).to(dtype)
    scale = torch.rand(I, generator=g) + 0.5
    thr = reference.midpoint_threshold(x.abs(), 0.5)
    _close(cpu.input_sparse_linear(x, w_t, thr), reference.input_sparse_linear(x, w_t, thr), dtype)
    _close(cpu.input_sparse_linear(x, w_t, thr, channel_scale=scale),
           reference.input_sparse_linear(x, w_t, thr, channel_scale=scale), dtype)
    ys = cpu.input_sparse_linears(x, [w_t, w_t[:, :100].contiguous()], thr)
    _close(ys[1], reference.input_sparse_linear(x, w_t[:, :100], thr), dtype)
    _close(cpu.sparse_down(x, w_t, thr), reference.sparse_down(x, w_t, thr), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kept", ["none", "all"])
def test_empty_and_full_kept_sets(kept, dtype):
    x, w_gate, w_up, w_down_t = _data(7, 5, dtype)
    thr = 1e9 if kept == "none" else -1.0
    for got, want in [
        (cpu.fused_gather_ffn(x, w_gate, w_up, w_down_t, thr), reference.fused_gather_ffn(x, w_gate, w_up, w_down_t, thr)),
        (cpu.coefficient_ffn(x, w_gate, w_up, w_down_t, thr), reference.coefficient_ffn(x, w_gate, w_up, w_down_t, thr)),
        (cpu.predicted_sparse_ffn(x, torch.zeros(5, I), w_gate, w_up, w_down_t, thr),
         reference.predicted_sparse_ffn(x, torch.zeros(5, I), w_gate, w_up, w_down_t, thr)),
        (cpu.input_sparse_linear(x, w_gate.t().contiguous(), thr),
         reference.input_sparse_linear(x, w_gate.t().contiguous(), thr)),
    ]:
        _close(got, want, dtype)
        if kept == "none":
            assert not got.float().any()


def test_unavailable_reasons_name_the_problem():
    x = torch.randn(1, H)
    w = torch.randn(I, H)
    assert cpu.unavailable_reason(x, w) is None
    assert "17 tokens" in cpu.unavailable_reason(torch.randn(17, H), w)
    assert "dtype" in cpu.unavailable_reason(x, w.double())
    assert "contiguous" in cpu.unavailable_reason(x, w.t())
    assert "contiguous" in cpu.unavailable_reason(x, w[:, ::2])
    with torch.enable_grad():
        assert "autograd" in cpu.unavailable_reason(x, w.requires_grad_())


def test_bad_input_gives_a_clear_error_not_a_wrong_answer():
    w = torch.randn(I, H)
    with pytest.raises(RuntimeError, match="at most 16 tokens"):
        cpu.linear(torch.randn(17, H), w)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu.fused_gather_ffn(torch.randn(1, H), w, w.t().contiguous().t(), w, 0.1)
    with pytest.raises(RuntimeError, match="threshold must hold"):
        cpu.coefficient_ffn(torch.randn(1, H), w, w, w, torch.zeros(3))
    with pytest.raises(ValueError, match="unknown activation"):
        cpu.coefficient_ffn(torch.randn(1, H), w, w, w, 0.1, act="tanh")


def test_a_build_killed_mid_way_does_not_block_the_next_one(tmp_path):
    """torch's build lock is a file a killed build leaves behind; the next build must not wait on it forever."""
    from torch.utils.file_baton import FileBaton

    (tmp_path / "lock").write_text("")  # what a build interrupted by Ctrl-C or a timeout leaves
    acquired = cpu.locked_build(tmp_path, lambda: FileBaton(str(tmp_path / "lock")).try_acquire())
    assert acquired, "torch's build lock was still held: the next build would wait forever"
    assert cpu.locked_build(tmp_path, lambda: "built") == "built"  # the OS lock was released after the first
