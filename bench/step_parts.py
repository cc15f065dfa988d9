"""Two parts of a decode step, timed alone on the Llama-3-8B shape: what `decode.GQA_DECODE_ATTENTION`
and `decode.FOLD_NORMS` each save per layer (issue 13).

    PYTHONPATH=. python bench/step_parts.py            # about 1 minute on an H100

- attention: one query token over a 256-slot bf16 cache (32 query heads, 8 key/value heads, head dim
  128, a boolean mask), as transformers' sdpa does it with a mask (``repeat_kv`` of keys and values,
  then SDPA) against `countdown.gqa_decode` (the group's heads as rows, SDPA on the cache as it is).
- norm + q/k/v: the RMSNorm compiled by Inductor (coordinate-descent tuning, as the Decoder compiles
  it) followed by the fused q/k/v input-sparse launch at 50% (TEAL's attention input), against the
  one launch with the norm applied inside (``input_sparse_multi(norm=...)``). The same for TEAL's
  gate + up launch. Inductor's norm here is the norm alone; in the decode step it also holds the
  residual add before it, which folding leaves as its own pointwise kernel.

Each variant runs 32 times (one per layer, each layer its own weights and cache, more bytes than L2)
inside one CUDA graph (`bench/input_sparse.py`'s ``bench_graph``: do_bench median of the replays), PDL
as the Decoder has it; µs per layer = replay / 32. Checks each
folded result against the unfolded one. Table last; JSON to $OUT/step_parts.json.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F

from bench.input_sparse import bench_graph
from countdown.kernels import input_sparse_prefetch, reference

LAYERS, HQ, HKV, D, SLOTS, H, I = 32, 32, 8, 128, 256, 4096, 14336
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


def norm_parts(g: torch.Generator, widths: tuple[int, ...], name: str) -> dict:
    dev, bf = "cuda", torch.bfloat16
    x = [(torch.randn(1, H, generator=g, device=dev) * 3).to(bf) for _ in range(LAYERS)]
    nw = [(torch.rand(H, generator=g, device=dev) + 0.5).to(bf) for _ in range(LAYERS)]
    ws = [[(torch.randn(H, n, generator=g, device=dev) / H**0.5).to(bf) for n in widths] for _ in range(LAYERS)]
    eps = 1e-5
    normed = reference.rms_norm(x[0], nw[0], eps)
    thr = float(normed.float().abs().median())  # about half the channels kept
    thrs = [torch.tensor([thr], device=dev)] * len(widths)
    norm = torch.compile(lambda h, w: reference.rms_norm(h, w, eps), dynamic=False,
                         options={"coordinate_descent_tuning": True})
    out: list = [None] * LAYERS

    def unfolded(i):
        out[i] = input_sparse_prefetch.input_sparse_multi(norm(x[i], nw[i]), ws[i], thrs)

    def folded(i):
        out[i] = input_sparse_prefetch.input_sparse_multi(x[i], ws[i], thrs, norm=(nw[i], eps))

    def norm_only(i):
        out[i] = norm(x[i], nw[i])

    rows = {f"Inductor norm + {name} launch": per_layer_us(unfolded)}
    want = [t.clone() for t in out[0]]
    rows[f"{name} launch with the norm inside"] = per_layer_us(folded)
    got = out[0]
    rows[f"{name} launch alone (norm precomputed)"] = per_layer_us(lambda i: input_sparse_prefetch.input_sparse_multi(
        normed, ws[i], thrs))
    rows["Inductor norm alone"] = per_layer_us(norm_only)
    return {"us": rows, "rel_err": max(rel(a, b) for a, b in zip(got, want))}


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator(device="cuda").manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "attention": attention_parts(g),
               "qkv": norm_parts(g, (4096, 1024, 1024), "q/k/v"),
               "gate_up": norm_parts(g, (I, I), "gate+up")}
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "step_parts.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(f"\nLlama-3-8B shape, bf16, batch 1, {LAYERS} layers in one CUDA graph, {results['gpu']}, "
          f"torch {results['torch']}, {time.time() - T0:.0f}s")
    print("| part | variant | µs per layer |\n|---|---|---|")
    for part in ("attention", "qkv", "gate_up"):
        for variant, us in results[part]["us"].items():
            print(f"| {part} | {variant} | {us:.2f} |")
        print(f"| {part} | relative error, new against old | {results[part]['rel_err']:.1e} |")


if __name__ == "__main__":
    main()
