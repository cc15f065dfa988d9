"""The one-token attention of a decode step timed alone on the Llama-3-8B shape: what
`decode.GQA_DECODE_ATTENTION` and `gqa_decode.TRITON_KERNEL` save per layer (issue 13).

    PYTHONPATH=. python bench/step_parts.py            # under a minute on an H100

One query token a row, at batch 1, 4 and 16, over a 256-slot bf16 cache (32 query heads, 8 key/value
heads, head dim 128, a boolean mask of a different length for each row), three ways:
- as transformers' sdpa does it with a mask (``repeat_kv`` of keys and values, then SDPA);
- `countdown.gqa_decode` (the group's heads as rows, SDPA on the cache as it is);
- the same packed step through countdown's Triton kernel (`countdown.kernels.decode_attention`, switched
  by `gqa_decode.TRITON_KERNEL`), with the cache split into programs of at least 64, 128 or 256 slots.

Each variant runs 32 times (one per layer, each layer its own cache) inside one CUDA graph
(`bench/input_sparse.py`'s ``bench_graph``: do_bench median of the replays), PDL as the Decoder has it;
µs per layer = replay / 32. Checks each result against the repeat_kv one. Table last; JSON to
$OUT/step_parts.json.

Session 10 also timed folding the RMSNorm into the q/k/v and gate + up launches here (commit 388c725,
raw bench/results/step-parts-h100-2026-12-07.json): slower than Inductor's norm kernel plus the launch,
so the fold was removed (docs/BENCHMARKS.md, session 10). Session 11 timed TEAL's FFN as one launch here
(commit a245852, raw bench/results/step-parts-attnk-tealffn-h100-2026-12-07.json): slower than the three
launches, removed (docs/KERNELS.md).
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F

from bench.input_sparse import bench_graph
from countdown.kernels import decode_attention, gqa_attention

LAYERS, HQ, HKV, D, SLOTS = 32, 32, 8, 128, 256
BATCHES = (1, 4, 16)
SLOTS_PER_PROGRAM = (64, 128, 256)
T0 = time.time()


def per_layer_us(fn) -> float:
    """Median µs per layer of ``fn(layer)`` for every layer, captured in one CUDA graph."""
    return bench_graph(fn, LAYERS)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def attention_parts(g: torch.Generator, batch: int) -> dict:
    dev, bf = "cuda", torch.bfloat16
    q = [torch.randn(batch, HQ, 1, D, generator=g, device=dev).to(bf) for _ in range(LAYERS)]
    k = [torch.randn(batch, HKV, SLOTS, D, generator=g, device=dev).to(bf) for _ in range(LAYERS)]
    v = [torch.randn(batch, HKV, SLOTS, D, generator=g, device=dev).to(bf) for _ in range(LAYERS)]
    filled = 200 - 7 * torch.arange(batch, device=dev)  # each row sees its own number of slots, as padding makes them
    mask = (torch.arange(SLOTS, device=dev)[None, :] < filled[:, None]).view(batch, 1, 1, SLOTS)
    out = [None] * LAYERS

    def repeated(i):
        kk = k[i][:, :, None].expand(batch, HKV, HQ // HKV, SLOTS, D).reshape(batch, HQ, SLOTS, D)
        vv = v[i][:, :, None].expand(batch, HKV, HQ // HKV, SLOTS, D).reshape(batch, HQ, SLOTS, D)
        out[i] = F.scaled_dot_product_attention(q[i], kk, vv, attn_mask=mask)

    def packed(i):
        out[i] = F.scaled_dot_product_attention(q[i].view(batch, HKV, HQ // HKV, D), k[i], v[i], attn_mask=mask)

    rows = {"repeat_kv + sdpa (transformers)": per_layer_us(repeated)}
    want = out[0].reshape(batch, HQ, D)
    rows["packed sdpa (gqa_decode)"] = per_layer_us(packed)
    errors = {"packed sdpa": rel(out[0].reshape(batch, HQ, D), want)}

    def kernel(i):
        out[i] = decode_attention(q[i].view(batch, HKV, HQ // HKV, D), k[i], v[i], mask)

    shipped = gqa_attention.SLOTS_PER_SPLIT
    for slots in SLOTS_PER_PROGRAM:  # how finely the kernel splits the cache (the shipped value is marked)
        gqa_attention.SLOTS_PER_SPLIT = slots
        mark = " (shipped)" if slots == shipped else ""
        rows[f"packed, countdown kernel, >= {slots} slots a program{mark}"] = per_layer_us(kernel)
        errors[f"countdown kernel, >= {slots} slots a program"] = rel(out[0].reshape(batch, HQ, D), want)
    gqa_attention.SLOTS_PER_SPLIT = shipped
    return {"us": rows, "rel_err": errors}


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator(device="cuda").manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "attention": {b: attention_parts(g, b) for b in BATCHES}}
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "step_parts.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(f"\nLlama-3-8B shape, bf16, one-token attention, {LAYERS} layers in one CUDA graph, {results['gpu']}, "
          f"torch {results['torch']}, {time.time() - T0:.0f}s")
    print("| batch | variant | µs per layer |\n|---|---|---|")
    for b, part in results["attention"].items():
        for variant, us in part["us"].items():
            print(f"| {b} | {variant} | {us:.2f} |")
        for name, err in part["rel_err"].items():
            print(f"| {b} | relative error, {name} against repeat_kv + sdpa | {err:.1e} |")


if __name__ == "__main__":
    main()
