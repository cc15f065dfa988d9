"""What one launch needs to read N bytes on this GPU: the floor that a GEMV of that size can reach.

    PYTHONPATH=. python3 bench/read_floor.py            # GPU; table last, JSON to $OUT/read_floor.json

Issue 13 asks the input-sparse GEMV for >= 90% of its byte floor (kept bytes / 3.0 TB/s) at 50% on the
4096 -> 4096, 4096 -> 1024 and fused q/k/v shapes: 16.8, 4.2 and 25.2 MB a call. This times the
simplest kernel that reads a contiguous buffer of exactly those sizes and does nothing else (each
program sums its slice in fp32 and stores one value), tuned over its launch parameters, and
``torch.sum`` beside it. Every figure is a CUDA graph of C launches over C rotated buffers (C x size >
200 MB, past the 50 MB L2), timed by do_bench (median), divided by C (``input_sparse.bench_graph``;
the 2026-12-07 figures were taken with 25/100 ms of warm-up/repeats, it uses 20/60): a launch after a launch, as the
GEMVs were timed (bench/input_sparse.py). If a pure read of a size cannot reach 90% of the byte floor,
no GEMV that reads those bytes can.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time

import torch
import triton
import triton.language as tl
from input_sparse import bench_graph  # bench/: a CUDA graph of C launches, do_bench median / C

BANDWIDTH = 3.0e12  # bytes/s: the copy bandwidth measured on the H100 (docs/KERNELS.md)
# bytes a call reads at 50% (half the input channels' rows), and a few sizes around them
SIZES_MB = {"k/v at 50% (2048 x 1024)": 2048 * 1024 * 2 / 1e6,
            "o_proj at 50% (2048 x 4096)": 2048 * 4096 * 2 / 1e6,
            "q/k/v at 50% (2048 x 6144)": 2048 * 6144 * 2 / 1e6,
            "o_proj dense (4096 x 4096)": 4096 * 4096 * 2 / 1e6,
            "down at 50% (7168 x 4096)": 7168 * 4096 * 2 / 1e6,
            "gate+up at 50% (2048 x 28672)": 2048 * 28672 * 2 / 1e6,
            "256 MB": 256.0}


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, per_program, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """x [n] bf16 contiguous; out [programs] fp32: program p sums x[p * per_program : (p + 1) * per_program]."""
    pid = tl.program_id(0)
    lo = pid * per_program
    hi = tl.minimum(lo + per_program, n)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(lo, hi, BLOCK, num_stages=STAGES):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < hi, other=0.0, eviction_policy="evict_first").to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def read(x: torch.Tensor, out: torch.Tensor, programs: int, block: int, stages: int, warps: int) -> None:
    n = x.numel()
    per_program = triton.cdiv(triton.cdiv(n, programs), block) * block
    _read_kernel[(triton.cdiv(n, per_program),)](x, out, n, per_program, BLOCK=block, STAGES=stages,
                                                  num_warps=warps, num_stages=stages)


def main() -> None:
    t0 = time.time()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    configs = list(itertools.product((1, 2, 4), (4096, 8192), (3, 4), (4, 8)))
    rows = []
    for name, mb in SIZES_MB.items():
        n = int(mb * 1e6) // 2
        copies = max(4, math.ceil(200e6 / (n * 2)))
        bufs = [torch.randn(n, device=dev).to(torch.bfloat16) for _ in range(copies)]
        out = torch.empty(8 * sms, device=dev, dtype=torch.float32)
        # correct first: one program's sum against torch's, fresh data
        read(bufs[0], out, 2 * sms, 4096, 4, 4)
        per = triton.cdiv(triton.cdiv(n, 2 * sms), 4096) * 4096
        ref = bufs[0][:per].float().sum()
        if not torch.allclose(out[0], ref, rtol=1e-3, atol=1e-2):
            raise SystemExit(f"{name}: read kernel sum {out[0].item()} != {ref.item()}")
        best = None
        for pps, block, stages, warps in configs:
            us = bench_graph(lambda c: read(bufs[c], out, pps * sms, block, stages, warps), copies)
            if best is None or us < best[0]:
                best = (us, dict(programs_per_sm=pps, block=block, stages=stages, warps=warps))
        torch_us = bench_graph(lambda c: bufs[c].sum(), copies)
        floor_us = n * 2 / BANDWIDTH * 1e6
        rows.append(dict(name=name, mb=n * 2 / 1e6, floor_us=floor_us, read_us=best[0], read_config=best[1],
                         torch_sum_us=torch_us, read_pct_floor=100 * floor_us / best[0],
                         read_gbs=n * 2 / best[0] / 1e3, torch_pct_floor=100 * floor_us / torch_us))
        del bufs
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "read_floor.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "bandwidth": BANDWIDTH, "rows": rows}, f, indent=1)
    print(f"\nOne launch reading N bytes, {torch.cuda.get_device_name()}, {time.time() - t0:.0f}s; us per launch in a "
          f"CUDA graph of launches over rotated buffers (median); floor = bytes / 3.0 TB/s")
    print("| read | MB | floor us | best read kernel us (% floor, GB/s) | torch.sum us (% floor) | config |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['mb']:.1f} | {r['floor_us']:.2f} | {r['read_us']:.2f} ({r['read_pct_floor']:.0f}%, "
              f"{r['read_gbs']:.0f}) | {r['torch_sum_us']:.2f} ({r['torch_pct_floor']:.0f}%) | {r['read_config']} |")


if __name__ == "__main__":
    main()
