"""Parts of a decode step timed alone on the Llama-3-8B shape (issue 13): what
`decode.GQA_DECODE_ATTENTION` and `gqa_decode.TRITON_KERNEL` save per layer of attention, and what
`kernels.teal_ffn.FUSE` (TEAL's FFN in one launch) saves per FFN layer.

    PYTHONPATH=. python bench/step_parts.py            # under a minute on an H100

One query token a row, at batch 1, 4 and 16, over a 256-slot bf16 cache (32 query heads, 8 key/value
heads, head dim 128, a boolean mask of a different length for each row), three ways:
- as transformers' sdpa does it with a mask (``repeat_kv`` of keys and values, then SDPA);
- `countdown.gqa_decode` (the group's heads as rows, SDPA on the cache as it is);
- the same packed step through countdown's Triton kernel (`countdown.kernels.decode_attention`, switched
  by `gqa_decode.TRITON_KERNEL`), with the cache split into programs of at least 64, 128 or 256 slots.

TEAL's FFN at 50% on x and on t, batch 1: the three-launch path (gate + up, the activation, down) against
the one-launch kernel in a few launch configurations, on 8 layers of their own weights (2.8 GB), with the
byte floor (kept rows' bytes / 3.0 TB/s) and the error against the fp32 reference.

Each attention variant runs 32 times (one per layer, each layer its own cache) inside one CUDA graph
(`bench/input_sparse.py`'s ``bench_graph``: do_bench median of the replays), PDL as the Decoder has it;
µs per layer = replay / 32. Checks each result against the repeat_kv one. Table last; JSON to
$OUT/step_parts.json.

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
from countdown.kernels import decode_attention, gqa_attention, reference
from countdown.kernels import teal_ffn

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


HIDDEN, INTER, FFN_COPIES, BW = 4096, 14336, 8, 3.0e12
# launch configurations of the one-launch TEAL FFN to time (the first is the shipped one)
FFN_CONFIGS = {
    "p1-k64-s3": teal_ffn.FfnConfig(),
    "p1-k32-s4": teal_ffn.FfnConfig(block_k=32, num_stages=4),
    "p2-k64-s3": teal_ffn.FfnConfig(programs_per_sm=2),
    "p1-k64-s3-pipe": teal_ffn.FfnConfig(pipe=True),
}


def teal_ffn_parts(g: torch.Generator, sparsity: float = 0.5) -> dict:
    """TEAL's FFN at ``sparsity`` on x and on t, per layer: three launches (gate + up, the activation,
    down) against the one-launch kernel in each of FFN_CONFIGS. FFN_COPIES layers of their own weights
    (2.8 GB, past the 50 MB L2)."""
    dev, bf = "cuda", torch.bfloat16
    layers = []
    for _ in range(FFN_COPIES):
        wg = (torch.randn(HIDDEN, INTER, generator=g, device=dev) / HIDDEN**0.5).to(bf)
        wu = (torch.randn(HIDDEN, INTER, generator=g, device=dev) / HIDDEN**0.5).to(bf)
        wd = (torch.randn(INTER, HIDDEN, generator=g, device=dev) / INTER**0.5).to(bf)
        x = torch.randn(1, HIDDEN, generator=g, device=dev).to(bf)
        thr_in = reference.midpoint_threshold(x.abs(), sparsity)
        xk = torch.where(x.float().abs() > thr_in, x.float(), 0.0)
        t = F.silu(xk @ wg.float()) * (xk @ wu.float())
        thr_co = reference.midpoint_threshold(t.abs(), sparsity)
        kept_bytes = 2 * (int((x.abs() > thr_in).sum()) * 2 * INTER + int((t.abs() > thr_co).sum()) * HIDDEN)
        layers.append(dict(x=x, w=[wg, wu], wd=wd, thr=(torch.tensor([thr_in], device=dev),
                                                          torch.tensor([thr_co], device=dev)), bytes=kept_bytes))
    out = [None] * FFN_COPIES

    def call(i):
        lay = layers[i]
        out[i] = teal_ffn.input_sparse_ffn(lay["x"], lay["w"], lay["wd"], *lay["thr"])

    floor_us = sum(lay["bytes"] for lay in layers) / FFN_COPIES / BW * 1e6
    want = reference.input_sparse_ffn(layers[0]["x"], layers[0]["w"], layers[0]["wd"],
                                      *(float(t) for t in layers[0]["thr"]))
    rows, errors = {}, {}
    teal_ffn.FUSE = False
    rows["three launches (gate + up, act, down)"] = bench_graph(call, FFN_COPIES)
    errors["three launches"] = rel(out[0], want)
    teal_ffn.FUSE = True
    shipped = teal_ffn._GPU_CONFIG
    for name, cfg in FFN_CONFIGS.items():
        teal_ffn._GPU_CONFIG = cfg
        mark = " (shipped)" if cfg == shipped else ""
        try:
            rows[f"one launch, {name}{mark}"] = bench_graph(call, FFN_COPIES)
            errors[f"one launch, {name}"] = rel(out[0], want)
        except Exception as e:  # a configuration that does not fit (registers, shared memory) is reported
            errors[f"one launch, {name}"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    teal_ffn._GPU_CONFIG = shipped
    return {"sparsity": sparsity, "floor_us": floor_us, "us": rows, "rel_err": errors}


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator(device="cuda").manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "attention": {b: attention_parts(g, b) for b in BATCHES},
               "teal_ffn": teal_ffn_parts(g)}
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
    ffn = results["teal_ffn"]
    print(f"\nTEAL FFN, x and t at {ffn['sparsity']:.0%}, batch 1, {FFN_COPIES} layers in one CUDA graph; "
          f"floor {ffn['floor_us']:.1f} µs a layer (kept bytes / 3.0 TB/s)")
    print("| variant | µs per layer | % of floor | GB/s |\n|---|---|---|---|")
    for variant, us in ffn["us"].items():
        print(f"| {variant} | {us:.2f} | {100 * ffn['floor_us'] / us:.0f}% | {ffn['floor_us'] * 3e3 / us:.0f} |")
    for name, err in ffn["rel_err"].items():
        print(f"| relative error, {name} against the fp32 reference | {err if isinstance(err, str) else f'{err:.1e}'} | | |")


if __name__ == "__main__":
    main()
