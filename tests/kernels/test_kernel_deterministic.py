"""Deterministic mode (``torch.use_deterministic_algorithms``): every split-K kernel sums its partials in a
fixed order instead of with fp32 atomics, gives the reference's result, and the same bits on every call.

In the interpreter programs run one after another, so repeatability only means something on a GPU;
what every run checks is that the ordered path is the one taken (more than one split or program), that
it computes the right thing on fresh random data, and that it leaves the default path's zero-on-exit
workspaces as it found them.
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DEVICE, ON_GPU, reference, rel_err, threshold_for, tol

from countdown import kernels
from countdown.kernels import _runtime, batch_ffn
from countdown.kernels import input_sparse as isp
from countdown.kernels import input_sparse_prefetch as pf

H, I = (4096, 14336) if ON_GPU else (72, 200)
K, NS = (4096, (4096, 1024, 1024)) if ON_GPU else (77, (45, 13, 29))


@pytest.fixture
def deterministic_mode():
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.fixture
def ordered_buffers(monkeypatch):
    """The split-slice buffers the launchers asked for (a non-empty list: the ordered path was taken)."""
    got = []
    real = _runtime.ordered_workspace

    def spy(*args, **kwargs):
        buf = real(*args, **kwargs)
        if buf is not None:
            got.append(buf)
        return buf

    monkeypatch.setattr(_runtime, "ordered_workspace", spy)
    return got


def fresh(*shape: int, seed: int, dtype=torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.randn(*shape, generator=g) * scale
    return (t + torch.where(t >= 0, 0.01, -0.01) * scale).to(DEVICE, dtype)  # no zeros


def twice_equal(fn) -> torch.Tensor:
    a, b = fn(), fn()
    assert torch.equal(a, b), "two calls in deterministic mode differ"
    return a


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_sparse_ffn_in_order(deterministic_mode, ordered_buffers, batch):
    """Batch 1 (``_core``: one workspace row per program) and 2-16 (``batch_ffn``: one slice per split);
    both take their slices from ``_runtime.ordered_workspace``."""
    t = fresh(batch, I, seed=batch).squeeze(0)
    w_down_t = fresh(I, H, seed=100 + batch, scale=I**-0.5)
    thr = threshold_for(t.float().abs(), 0.5)
    if batch > 1:
        assert batch_ffn._down_grid(H, I, batch_ffn.pick_config(DEVICE, batch))[0] > 1
    y = twice_equal(lambda: kernels.sparse_down(t, w_down_t, thr))
    assert rel_err(y, reference.sparse_down(t, w_down_t, thr)) <= tol(torch.bfloat16)
    assert ordered_buffers  # the ordered path was taken
    torch.use_deterministic_algorithms(False)  # the default path after it: its workspace is still zero
    assert rel_err(kernels.sparse_down(t, w_down_t, thr), reference.sparse_down(t, w_down_t, thr)) <= tol(torch.bfloat16)


@pytest.mark.parametrize("batch", [2, 3, 16])
def test_input_sparse_walk_in_order(deterministic_mode, ordered_buffers, batch):
    x = fresh(batch, K, seed=batch)
    w_t = fresh(K, NS[0], seed=200 + batch, scale=K**-0.5)
    thr = threshold_for(x.float().abs(), 0.5)
    cfg = isp.pick_config(batch, K, NS[0], x.device)
    assert isp._grid(cfg, K, NS[0], x.device)[1] > 1
    ref = reference.input_sparse_linear(x, w_t, thr)
    y = twice_equal(lambda: isp._launch(x, w_t, None, None, thr, torch.full_like(ref, float("nan")), cfg))
    assert rel_err(y, ref) <= tol(torch.bfloat16)
    assert ordered_buffers
    torch.use_deterministic_algorithms(False)
    assert rel_err(isp._launch(x, w_t, None, None, thr, torch.empty_like(ref), cfg), ref) <= tol(torch.bfloat16)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("wina", [False, True], ids=["teal", "wina"])
def test_input_sparse_prefetch_qkv_in_order(deterministic_mode, ordered_buffers, batch, wina):
    """q, k and v in one launch, each output summed from its own columns of every split's slice."""
    x = fresh(batch, K, seed=batch + 7 * wina)
    w_ts = [fresh(K, n, seed=300 + i, scale=K**-0.5) for i, n in enumerate(NS)]
    scales = [(torch.rand(K, generator=torch.Generator().manual_seed(i)) + 0.25).to(DEVICE) if wina else None
              for i in range(len(NS))]
    thrs = [threshold_for(x.float().abs() * (1 if s is None else s), 0.5) for s in scales]
    cfg = pf.PrefetchConfig(block_n=16 * (4 if ON_GPU else 1), block_k=16, num_stages=1, min_kpp=16,
                            programs_per_sm=16 if not ON_GPU else 2)
    assert pf.grid(cfg, K, list(NS), x.device, batch)[1] > 1
    refs = [reference.input_sparse_linear(x, w, t, channel_scale=s) for w, t, s in zip(w_ts, thrs, scales)]

    def run():
        outs = [torch.full_like(r, float("nan")) for r in refs]
        pf.launch(x, w_ts, scales, [None] * 3, thrs, outs, cfg)
        return torch.cat(outs, dim=-1)

    y = twice_equal(run)
    assert rel_err(y, torch.cat(refs, dim=-1)) <= tol(torch.bfloat16)
    assert ordered_buffers
    torch.use_deterministic_algorithms(False)
    assert rel_err(run(), torch.cat(refs, dim=-1)) <= tol(torch.bfloat16)
