"""One part of a decode step timed alone on the Llama-3-8B shape: what `decode.GQA_DECODE_ATTENTION`
saves per layer (issue 13).

    PYTHONPATH=. python bench/step_parts.py            # under a minute on an H100

One query token over a 256-slot bf16 cache (32 query heads, 8 key/value heads, head dim 128, a boolean
mask), as transformers' sdpa does it with a mask (``repeat_kv`` of keys and values, then SDPA) against
`countdown.gqa_decode` (the group's heads as rows, SDPA on the cache as it is). Each variant runs 32
times (one per layer, each layer its own cache) inside one CUDA graph (`bench/input_sparse.py`'s
``bench_graph``: do_bench median of the replays), PDL as the Decoder has it; µs per layer = replay / 32.
Checks the new result against the old. Table last; JSON to $OUT/step_parts.json.

Session 10 also timed folding the RMSNorm into the q/k/v and gate + up launches here (commit 388c725,
raw bench/results/step-parts-h100-2026-12-07.json): slower than Inductor's norm kernel plus the launch,
so the fold was removed (docs/BENCHMARKS.md, session 10).
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F

from bench.input_sparse import bench_graph

LAYERS, HQ, HKV, D, SLOTS = 32, 32, 8, 128, 256
T0 = time.time()


def per_layer_us(fn) -> float:
    """Median µs per layer of ``fn(layer)`` for every layer, captured in one CUDA graph."""
    return bench_graph(fn, LAYERS)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def attention_parts(g: torch.Generator) -> dict:
    dev, bf = "cuda", torch.bfloat16
    q = [torch.randn(1, HQ, 1, D, generator=g, device=dev).to(bf) for _ in range(LAYERS)]
    k = [torch.randn(1, HKV, SLOTS, D, generator=g, device=dev).to(bf) for _ in range(LAYERS)]
    v = [torch.randn(1, HKV, SLOTS, D, generator=g, device=dev).to(bf) for _ in range(LAYERS)]
    mask = (torch.arange(SLOTS, device=dev) < 200).view(1, 1, 1, SLOTS)  # 200 filled slots
    out = [None] * LAYERS

    def repeated(i):
        kk = k[i][:, :, None].expand(1, HKV, HQ // HKV, SLOTS, D).reshape(1, HQ, SLOTS, D)
        vv = v[i][:, :, None].expand(1, HKV, HQ // HKV, SLOTS, D).reshape(1, HQ, SLOTS, D)
        out[i] = F.scaled_dot_product_attention(q[i], kk, vv, attn_mask=mask)

    def packed(i):
        out[i] = F.scaled_dot_product_attention(q[i].view(1, HKV, HQ // HKV, D), k[i], v[i], attn_mask=mask)

    rows = {"repeat_kv + sdpa (transformers)": per_layer_us(repeated)}
    want = out[0].reshape(1, HQ, D)
    rows["packed sdpa (gqa_decode)"] = per_layer_us(packed)
    return {"us": rows, "rel_err": rel(out[0].reshape(1, HQ, D), want)}


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator(device="cuda").manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "attention": attention_parts(g)}
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "step_parts.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(f"\nLlama-3-8B shape, bf16, batch 1, {LAYERS} layers in one CUDA graph, {results['gpu']}, "
          f"torch {results['torch']}, {time.time() - T0:.0f}s")
    print("| part | variant | µs per layer |\n|---|---|---|")
    for part in ("attention",):
        for variant, us in results[part]["us"].items():
            print(f"| {part} | {variant} | {us:.2f} |")
        print(f"| {part} | relative error, new against old | {results[part]['rel_err']:.1e} |")


if __name__ == "__main__":
    main()
