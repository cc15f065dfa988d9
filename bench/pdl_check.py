"""Programmatic dependent launch: are the batch-1 decode kernels still right when each one may start
while the one before it drains? (GPU, about a minute.)

    PYTHONPATH=. python bench/pdl_check.py

A chain of STEPS calls, each taking the previous call's output as its input, is captured as one CUDA
graph with PDL on (`countdown.kernels._core.set_pdl`), so every call's only input is written by the
kernel launched just before it: a call that read its input before the previous call had finished
would see stale or partial values. Every step is then compared with the pure-torch reference
computed on the input that step actually received (fp32), for:

    input-sparse GEMV, 4096 -> 4096 (TEAL, threshold = the 50% quantile of |x|, and threshold 0)
    q, k, v in one launch, 4096 -> 4096/1024/1024 (q feeds the next step)
    M-COUNTDOWN's fused FFN, 4096 -> 14336 -> 4096 (70% of neurons dropped)

The same chains are also replayed with PDL off, as the control. Fresh random inputs every step; outputs
are poisoned (NaN) before each replay. Prints the worst relative error per kernel and a verdict; exit
code 1 if any step is off by more than TOL.
"""

from __future__ import annotations

import sys

import torch

from countdown.kernels import _core, fused_gather_ffn, input_sparse_linear, reference
from countdown.kernels.input_sparse_prefetch import input_sparse_multi

STEPS = 24
TOL = 0.1  # a few near-threshold flips cost ~2% each; a stale or partial input costs O(1) or NaN
H, I_FFN = 4096, 14336


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def chain(step, x0: torch.Tensor, pdl: bool, steps: int = STEPS) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(inputs, outputs) of ``steps`` chained calls of ``step`` replayed from one CUDA graph."""
    default = _core.PDL
    _core.set_pdl(pdl)
    try:
        bufs = [x0.clone()]
        for _ in range(3):  # warm-up: compile and autotune outside the capture
            step(bufs[0])
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(steps):
                bufs.append(step(bufs[-1]))
    finally:
        _core.set_pdl(default)
    for b in bufs[1:]:
        b.fill_(float("nan"))
    bufs[0].copy_(x0)
    graph.replay()
    torch.cuda.synchronize()
    return bufs[:-1], bufs[1:]


def check(name: str, step, reference_step, x0: torch.Tensor, steps: int = STEPS) -> bool:
    worst = {}
    for pdl in (False, True):
        ins, outs = chain(step, x0, pdl, steps)
        errs = [rel(o, reference_step(i)) for i, o in zip(ins, outs)]
        worst[pdl] = float("nan") if any(e != e for e in errs) else max(errs)
        bad = [k for k, e in enumerate(errs) if not e <= TOL]
        if bad:
            print(f"  {name}, PDL {'on' if pdl else 'off'}: steps {bad[:8]} off (rel err {max(errs):.2e})")
    ok = all(v <= TOL for v in worst.values())  # NaN fails
    print(f"{name:44s} worst rel err: PDL off {worst[False]:.1e}, PDL on {worst[True]:.1e}  {'ok' if ok else 'WRONG'}")
    return ok


def main() -> None:
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    ok = True

    # input-sparse GEMV: W scaled so |y| ~ |x| whatever the kept fraction
    w_t = (torch.randn(H, H, device=dev) / H**0.5 * 2**0.5).to(dt)
    x0 = torch.randn(1, H, device=dev).to(dt)
    thr = torch.tensor([float(x0.float().abs().quantile(0.5))], device=dev)
    ok &= check("input-sparse GEMV 4096->4096, s~0.5",
                lambda x: input_sparse_linear(x, w_t, thr),
                lambda x: reference.input_sparse_linear(x.float(), w_t.float(), float(thr)), x0)
    ok &= check("input-sparse GEMV 4096->4096, threshold 0",
                lambda x: input_sparse_linear(x, w_t, 0.0),
                lambda x: reference.input_sparse_linear(x.float(), w_t.float(), 0.0), x0)

    # q, k, v in one launch; q (4096 wide) is the next step's input
    wq = (torch.randn(H, H, device=dev) / H**0.5 * 2**0.5).to(dt)
    wk, wv = [(torch.randn(H, 1024, device=dev) / H**0.5).to(dt) for _ in range(2)]
    thr3 = [thr.clone() for _ in range(3)]
    ok &= check("q/k/v one launch (q chained)",
                lambda x: input_sparse_multi(x, [wq, wk, wv], thr3)[0],
                lambda x: reference.input_sparse_linear(x.float(), wq.float(), float(thr)), x0)

    # M-COUNTDOWN: up dense, gate and down rows of the kept neurons (|W_up x| > thr)
    w_up = (torch.randn(I_FFN, H, device=dev) / H**0.5).to(dt)
    w_gate = (torch.randn(I_FFN, H, device=dev) / H**0.5).to(dt)
    w_down_t = (torch.randn(I_FFN, H, device=dev) / I_FFN**0.5 * 2).to(dt)  # |y| ~ |x| at 70% dropped
    u = (x0.float() @ w_up.float().t()).abs()
    thr_m = torch.tensor([float(u.quantile(0.7))], device=dev)
    ok &= check("M-COUNTDOWN fused FFN 4096->14336->4096, s~0.7",
                lambda x: fused_gather_ffn(x, w_up, w_gate, w_down_t, thr_m, act="silu", dense="up"),
                lambda x: reference.fused_gather_ffn(x.float(), w_up.float(), w_gate.float(), w_down_t.float(),
                                                     float(thr_m), act="silu", dense="up"), x0,
                steps=6)  # the FFN is quadratic in x: a longer chain overflows bf16 (PDL on and off alike)
    print("PDL chains:", "all steps right" if ok else "SOME STEPS WRONG")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
