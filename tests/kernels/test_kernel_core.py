"""The shared kernel under every launch configuration it ships with, with poisoned outputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernel_cases import DEVICE, SMALL, _core, reference, rel_err, threshold_for, weights

from countdown.kernels import _runtime

BASE = _core.pick_config(_core.KIND_SCORE, False, *SMALL, DEVICE)
CONFIGS = {
    "base": {},
    "interleave": dict(interleave=True, block_d=2),
    "nopipe": dict(pipe=False),
    "pipe": dict(pipe=True, block_i=2),
    "pipe_block_i1_chunk8": dict(pipe=True, block_i=1, chunk=8),
    "block_i8": dict(block_i=8, block_d=8),
    "one_program": dict(programs_per_sm=1, chunk=256),
}
# (kind, compute, reference function of (x, p, vec, thr))
PATHS = {
    "t": (_core.KIND_T, False),
    "t_computed": (_core.KIND_T, True),
    "gate": (_core.KIND_GATE, False),
    "gate_computed": (_core.KIND_GATE, True),
    "up": (_core.KIND_UP, False),
    "up_computed": (_core.KIND_UP, True),
    "score": (_core.KIND_SCORE, False),
}


def _inputs(path, x, p):
    g = x.float() @ p.w_gate.float().t()
    u = x.float() @ p.w_up.float().t()
    if path.startswith("t"):
        t = reference.activation(g, "silu") * u
        return t, t.abs(), lambda thr: reference.coefficient_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr)
    if path.startswith("gate"):
        return g, reference.activation(g, "silu").abs(), lambda thr: reference.gather_ffn(
            x, g, p.w_up, p.w_down_t, thr, dense="gate", score_act=True)
    if path.startswith("up"):
        return u, u.abs(), lambda thr: reference.gather_ffn(x, u, p.w_gate, p.w_down_t, thr, dense="up")
    s = torch.randn(p.w_down_t.shape[0], device=DEVICE)
    return s, s, lambda thr: reference.predicted_sparse_ffn(x, s, p.w_gate, p.w_up, p.w_down_t, thr)


# Every configuration on the path that reads most (score: three gathered rows); the ones that
# touch phase 1 on a computed path; each remaining path once (the op tests cover them too).
CASES = [("score", c) for c in CONFIGS] + [
    ("gate_computed", c) for c in ("base", "interleave", "pipe")] + [
    ("t_computed", "interleave"), ("up_computed", "interleave"), ("t", "pipe"), ("gate", "block_i8"),
    ("up", "base")]


@pytest.mark.parametrize("path,config", CASES, ids=[f"{p}-{c}" for p, c in CASES])
def test_launch_configs_poisoned(path, config):
    hidden, inter = SMALL
    kind, compute = PATHS[path]
    cfg = dataclasses.replace(BASE, **CONFIGS[config])
    x, p = weights(hidden, inter, torch.bfloat16, seed=len(path) + len(config))
    vec, score, ref_fn = _inputs(path, x, p)
    thr = threshold_for(score, 0.6)
    ref = ref_fn(thr)
    for _ in range(2):  # the second call reuses the workspace the first must have left zero
        out = torch.full((hidden,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        y = _core.launch(kind, compute, x, vec, p.w_gate, p.w_up, p.w_down_t, None, thr, "silu",
                         path.startswith("gate"), torch.bfloat16, config=cfg, out=out)
        assert y.data_ptr() == out.data_ptr()
        assert rel_err(y, ref) <= 1e-2
        assert not _runtime.persistent_workspace(DEVICE, hidden + 1).any()  # partial sums and ticket zero


def test_all_neurons_dropped_gives_zeros():
    hidden, inter = SMALL
    x, p = weights(hidden, inter, torch.float32, seed=1)
    out = torch.full((hidden,), float("nan"), device=DEVICE)
    score = torch.randn(inter, device=DEVICE)
    y = _core.launch(_core.KIND_SCORE, False, x, score, p.w_gate, p.w_up, p.w_down_t, None, 1e9, "silu", False,
                     torch.float32, out=out)
    assert torch.equal(y, torch.zeros_like(y))


def test_pdl_never_reaches_the_interpreter():
    # programmatic dependent launch is a CUDA launch attribute (KernelPolicy.pdl, on by default, where the GPU
    # has it): a CPU launch (Triton's interpreter) gets no PDL arguments, whatever the policy says
    for on in (True, False):
        assert _runtime.pdl_meta(torch.device("cpu"), on) == {}
        assert not _runtime.pdl_launch(torch.device("cpu"), on)
    assert not _runtime.pdl_meta(DEVICE, False)  # off: never, on any device
