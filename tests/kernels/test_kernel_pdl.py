"""Programmatic dependent launch (GPU only): the batch-1 decode kernels stay right when each one may
start while the one before it drains.

A chain of calls, each taking the previous call's output as its input, is captured as one CUDA graph,
so every call's only input is written by the kernel launched just before it: a call that read its
input before the previous call had finished would see stale or partial values (the outputs are
poisoned with NaN before the replay). Every step is compared with the pure-torch reference on the
input that step actually received, with PDL on and off (the control). Skipped without CUDA: the
interpreter has no launch overlap to test.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="PDL needs a CUDA GPU (Hopper or later)")

STEPS = 24
TOL = 0.1  # a few near-threshold flips cost ~2% each (bf16); a stale or partial input costs O(1) or NaN
H, I_FFN = 4096, 14336


@contextlib.contextmanager
def pdl(on: bool):
    """PDL on or off for the launches inside: through the kernel policy where it has a ``pdl`` field
    (issue 25), else through today's `_core.set_pdl`."""
    import countdown

    policy_cls = getattr(countdown, "KernelPolicy", None)
    if policy_cls is not None and hasattr(policy_cls, "use") and "pdl" in policy_cls.__dataclass_fields__:
        with policy_cls(pdl=on).use():
            yield
        return
    from countdown.kernels import _core

    before = _core.PDL
    _core.set_pdl(on)
    try:
        yield
    finally:
        _core.set_pdl(before)


def chain(step, x0: torch.Tensor, on: bool, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(inputs, outputs) of ``steps`` chained calls of ``step`` replayed from one CUDA graph."""
    with pdl(on):
        bufs = [x0.clone()]
        for _ in range(3):  # compile and autotune outside the capture
            step(bufs[0])
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(steps):
                bufs.append(step(bufs[-1]))
    for b in bufs[1:]:
        b.fill_(float("nan"))
    bufs[0].copy_(x0)
    graph.replay()
    torch.cuda.synchronize()
    return bufs[:-1], bufs[1:]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def assert_chain_right(step, reference_step, x0: torch.Tensor, steps: int = STEPS) -> None:
    for on in (False, True):
        ins, outs = chain(step, x0, on, steps)
        errs = [rel(o, reference_step(i)) for i, o in zip(ins, outs)]
        bad = [k for k, e in enumerate(errs) if not e <= TOL]  # NaN fails
        assert not bad, f"PDL {'on' if on else 'off'}: steps {bad[:8]} wrong (worst rel err {max(errs):.2e})"


def _gemv_weights():
    torch.manual_seed(0)
    w_t = (torch.randn(H, H, device="cuda") / H**0.5 * 2**0.5).to(torch.bfloat16)  # |y| ~ |x|
    x0 = torch.randn(1, H, device="cuda").to(torch.bfloat16)
    return w_t, x0


@pytest.mark.parametrize("sparsity", [0.5, 0.0])
def test_input_sparse_gemv_chain(sparsity):
    from countdown.kernels import input_sparse_linear, reference

    w_t, x0 = _gemv_weights()
    thr = float(x0.float().abs().quantile(sparsity)) if sparsity else 0.0
    assert_chain_right(lambda x: input_sparse_linear(x, w_t, thr),
                       lambda x: reference.input_sparse_linear(x.float(), w_t.float(), thr), x0)


def test_qkv_one_launch_chain():
    from countdown.kernels import input_sparse_linears, reference

    wq, x0 = _gemv_weights()
    wk, wv = [(torch.randn(H, 1024, device="cuda") / H**0.5).to(torch.bfloat16) for _ in range(2)]
    thr = float(x0.float().abs().quantile(0.5))
    assert_chain_right(lambda x: input_sparse_linears(x, [wq, wk, wv], thr)[0],  # q feeds the next step
                       lambda x: reference.input_sparse_linear(x.float(), wq.float(), thr), x0)


def test_m_countdown_fused_ffn_chain():
    from countdown.kernels import fused_gather_ffn, reference

    torch.manual_seed(0)
    dt = torch.bfloat16
    x0 = torch.randn(1, H, device="cuda").to(dt)
    w_up = (torch.randn(I_FFN, H, device="cuda") / H**0.5).to(dt)
    w_gate = (torch.randn(I_FFN, H, device="cuda") / H**0.5).to(dt)
    w_down_t = (torch.randn(I_FFN, H, device="cuda") / I_FFN**0.5 * 2).to(dt)  # |y| ~ |x| at 70% dropped
    thr = float((x0.float() @ w_up.float().t()).abs().quantile(0.7))
    assert_chain_right(lambda x: fused_gather_ffn(x, w_up, w_gate, w_down_t, thr, act="silu", dense="up"),
                       lambda x: reference.fused_gather_ffn(x.float(), w_up.float(), w_gate.float(),
                                                            w_down_t.float(), thr, act="silu", dense="up"),
                       x0, steps=6)  # quadratic in x: a longer chain overflows bf16, PDL on and off alike
