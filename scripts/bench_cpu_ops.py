"""Each CPU FFN op alone against its bytes: where a CPU decode step's FFN time goes.

    PYTHONPATH=. python scripts/bench_cpu_ops.py [--hidden 1536 --intermediate 8960 --layers 28 --dtype bfloat16]

Defaults: one Qwen2.5-Coder-1.5B FFN shape, bf16; ``--layers`` distinct random layers are cycled so the
weights (2.3 GB by default) exceed the caches, as in a decode step. Rows: the dense FFN through the C++ GEMV
(gate, up, down), M-COUNTDOWN 70% and CATS 50% through their fused op with thresholds set on the data for
that sparsity. Prints ms per layer, bytes read, GB/s and the share of the read bandwidth measured here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from countdown.kernels import cpu
from countdown.loading import resolve_dtype
from countdown.speed import read_bandwidth_gbs


def threshold_for(score: torch.Tensor, sparsity: float) -> float:
    """The |score| below which ``sparsity`` of the entries fall."""
    flat = score.float().abs().flatten()
    return float(flat.kthvalue(max(1, int(sparsity * flat.numel()))).values)


def seconds_per_layer(fn, layers, repeats: int) -> float:
    with torch.no_grad():
        for layer in layers:  # warm-up
            fn(layer)
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            for layer in layers:
                fn(layer)
            runs.append((time.perf_counter() - t) / len(layers))
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=8960)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    H, I, dtype = args.hidden, args.intermediate, resolve_dtype(args.dtype)
    if cpu.extension_reason() is not None:
        raise SystemExit(cpu.extension_reason())

    g = torch.Generator().manual_seed(0)
    layers = [tuple((torch.randn(I, H, generator=g) / H**0.5).to(dtype) for _ in range(3)) for _ in range(args.layers)]
    x = torch.randn(1, H, generator=g).to(dtype)
    gate0, up0, _ = layers[0]
    t_mc = threshold_for(x @ up0.t(), 0.7)
    t_cats = threshold_for(F.silu(x @ gate0.t()), 0.5)

    def dense(layer):  # W_down laid [I, H] as the sparse ops read it: its transpose is the [H, I] weight
        gate, up, down_t = layer
        return cpu.linear(F.silu(cpu.linear(x, gate)) * cpu.linear(x, up), down_t.t())

    def m_countdown(layer):
        gate, up, down_t = layer
        return cpu.fused_gather_ffn(x, up, gate, down_t, t_mc, dense="up")

    def cats(layer):
        gate, up, down_t = layer
        return cpu.fused_gather_ffn(x, gate, up, down_t, t_cats, dense="gate", score_act=True)

    bandwidth = read_bandwidth_gbs()
    print(f"read bandwidth {bandwidth:.1f} GB/s; {torch.get_num_threads()} threads; H {H}, I {I}, {args.dtype}, "
          f"{args.layers} layers cycled")
    unit = H * I * dtype.itemsize
    rows = (("dense gate+up+down (C++ GEMV x3)", dense, 3 * unit),
            ("M-COUNTDOWN 70% fused op", m_countdown, unit + 2 * 0.3 * unit),
            ("CATS 50% fused op", cats, unit + 2 * 0.5 * unit))
    for name, fn, nbytes in rows:
        t = seconds_per_layer(fn, layers, args.repeats)
        gbs = nbytes / t / 1e9
        print(f"{name:36s} {t * 1e3:6.2f} ms/layer  {nbytes / 1e6:6.1f} MB  {gbs:5.1f} GB/s  ({gbs / bandwidth:.0%} of read)")


if __name__ == "__main__":
    main()
