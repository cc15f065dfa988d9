"""The one split-K epilogue (``_runtime.split_k_epilogue``) and the four launchers that end in it.

What a race between the last program's reads and its zeroing would break, and what Triton's interpreter
can show (it runs programs one after another, so it cannot interleave them): the last program must see
every program's partial sums (the output is the full sum), and must leave the persistent workspace and
the tickets zero, so that the next call on the same workspace starts clean (the same result again).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernel_cases import DEVICE, ON_GPU, reference, rel_err, threshold_for, tol

from countdown.kernels import _core, _runtime, batch_ffn
from countdown.kernels import input_sparse as isp
from countdown.kernels import input_sparse_prefetch as pf


@triton.jit
def _sum_kernel(x_ptr, ws_ptr, cnt_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """out[j] = sum over programs p of x[p, j]: each program's row of x is its partial sum."""
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.load(x_ptr + tl.program_id(0) * N + offs, mask=mask, other=0.0)
    _runtime.split_k_epilogue(acc, ws_ptr + offs, out_ptr + offs, mask, cnt_ptr, tl.num_programs(0))


@pytest.mark.parametrize("splits", [1, 2, 7])
def test_epilogue_sums_every_program_and_leaves_its_workspace_zero(splits):
    n = 37  # not a power of two: masked lanes
    x = torch.randn(splits, n, generator=torch.Generator().manual_seed(splits)).to(DEVICE)
    ws = torch.zeros(n, device=DEVICE)
    ticket = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    for _ in range(2):  # the second call finds what the first left
        out = torch.full((n,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        _sum_kernel[(splits,)](x, ws, ticket, out, n, BLOCK=64)
        assert rel_err(out, x.sum(0).to(torch.bfloat16)) <= tol(torch.bfloat16)
        assert not ws.any() and not ticket.any()


def _workspaces_zero() -> bool:
    return all(not ws.any() for ws in _runtime._PERSISTENT_WS.values())


def _fresh(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, torch.bfloat16)


H, I = (4096, 14336) if ON_GPU else (40, 136)
K, N = (4096, 1024) if ON_GPU else (77, 45)


def _ffn_batch_1():
    t = _fresh(I, seed=1)
    w_down_t = _fresh(I, H, seed=2, scale=I**-0.5)
    thr = threshold_for(t.float().abs(), 0.5)
    assert triton.cdiv(I, _core.pick_config(_core.KIND_T, False, H, I, t.device).block_i) > 1
    return (lambda: _core.launch(_core.KIND_T, False, w_down_t, t, None, None, w_down_t, None, thr, "silu", False,
                                 torch.bfloat16),
            reference.sparse_down(t, w_down_t, thr))


def _ffn_batched():
    t = _fresh(3, I, seed=3)
    w_down_t = _fresh(I, H, seed=4, scale=I**-0.5)
    thr = threshold_for(t.float().abs(), 0.5)
    for compact_max_batch in (0, 16):  # both down kernels
        assert batch_ffn._down_grid(H, I, batch_ffn.pick_config(t.device, 3, compact_max_batch))[0] > 1
    return (lambda: torch.cat([batch_ffn.launch(_core.KIND_T, False, None, t, None, None, w_down_t, None, thr, "silu",
                                                False, compact_max_batch=c) for c in (0, 16)]),
            torch.cat([reference.sparse_down(t, w_down_t, thr)] * 2))


def _input_sparse_walk():
    x = _fresh(3, K, seed=5)
    w_t = _fresh(K, N, seed=6, scale=K**-0.5)
    thr = threshold_for(x.float().abs(), 0.5)
    assert isp._grid(isp.pick_config(3, K, N, x.device), K, N, x.device)[1] > 1
    return (lambda: isp._launch(x, w_t, None, None, thr, torch.empty(3, N, dtype=x.dtype, device=DEVICE)),
            reference.input_sparse_linear(x, w_t, thr))


def _input_sparse_prefetch():
    x = _fresh(2, K, seed=7)
    w_ts = [_fresh(K, n, seed=8 + n, scale=K**-0.5) for n in (N, 13, 29)]
    thr = threshold_for(x.float().abs(), 0.5)
    cfg = pf.PrefetchConfig(block_n=16, block_k=16, num_stages=1, programs_per_sm=64, min_kpp=16)
    assert pf.grid(cfg, K, [N, 13, 29], x.device, 2)[1] > 1
    return (lambda: torch.cat(pf.input_sparse_multi(x, w_ts, [thr] * 3, config=cfg), dim=1),
            torch.cat([reference.input_sparse_linear(x, w_t, thr) for w_t in w_ts], dim=1))


@pytest.mark.parametrize("case", [_ffn_batch_1, _ffn_batched, _input_sparse_walk, _input_sparse_prefetch],
                         ids=["ffn-batch-1", "ffn-batched", "input-sparse-walk", "input-sparse-prefetch"])
def test_launchers_leave_the_shared_workspace_zero(case):
    run, ref = case()
    first = run()
    assert _workspaces_zero(), "partial sums or tickets left behind"
    assert rel_err(first, ref) <= tol(torch.bfloat16)
    second = run()  # the same persistent workspace again
    assert _workspaces_zero()
    assert torch.equal(first, second) or (ON_GPU and rel_err(second, first) <= 1e-3)  # GPU: atomics' order
