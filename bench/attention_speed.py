"""Beyond the FFN (issue 13): decode speed with attention-projection input sparsity, end to end.

    PYTHONPATH=. python bench/attention_speed.py                 # Llama-3-8B shape, compiled fast loop

Configurations, each in the same process on the same random-weight bf16 model, sparsified with the
library defaults (positions="decode", kernels="auto"), thresholds calibrated on random token windows:
dense; M-COUNTDOWN 70% (FFN only); M-COUNTDOWN 70% + attention inputs 50%; TEAL 50% (FFN only);
TEAL model-wide 50% (FFN + attention inputs). Decode tokens/s through `countdown.decode.Decoder`
(CUDA graph, torch.compile), batch 1, prompt 128 → 256 new tokens, median of 3 after a warm-up; the
ideal speed-up from bytes at the measured sparsities; GPU memory. Table last; JSON to $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import countdown
from countdown.decode import Decoder
from countdown.evaluate import perplexity
from countdown.loading import random_inputs, random_model
from countdown.speed import model_bytes

CONFIGS = (("dense", 0.0, None), ("m-countdown", 0.7, None), ("m-countdown", 0.7, 0.5), ("teal", 0.5, None),
           ("teal", 0.5, 0.5))
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.0f}s]", *a, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    model = random_model(args.shape, "cuda", "bfloat16")
    prompt, calib = random_inputs(model, 128, 4)
    nb = model_bytes(model)
    context = 128 + args.new_tokens / 2
    rows = []
    for method, s, attention in CONFIGS:
        if method != "dense":
            countdown.sparsify(model, method, s, calibration=calib, attention=attention, progress=False)
        decoder = Decoder(model, max_len=128 + args.new_tokens, compile=not args.no_compile)
        decoder.generate(prompt, args.new_tokens)
        results = [decoder.generate(prompt, args.new_tokens) for _ in range(3)]
        tps = statistics.median(r.tokens_per_second for r in results)
        del decoder
        row = {"method": method, "target": s, "attention": attention, "tokens_per_s": tps,
               "memory_gib": torch.cuda.memory_allocated() / 2**30}
        if method != "dense":
            seq = results[0].tokens[0]
            seen = perplexity(model, seq, context=seq.numel(), stride=args.new_tokens, progress=False)
            row.update(measured=seen.sparsity, attention_measured=seen.attention_sparsity,
                       bytes=nb.per_token(context, seen.ffn_bytes_read, 0, seen.attention_sparsity))
            countdown.unsparsify(model)
        else:
            row.update(measured=0.0, attention_measured={}, bytes=nb.per_token(context))
        rows.append(row)
        log(json.dumps(row))
    dense = rows[0]
    for r in rows:
        r["speedup"], r["ideal"] = r["tokens_per_s"] / dense["tokens_per_s"], dense["bytes"] / r["bytes"]
        r["gb_per_s"] = r["bytes"] * r["tokens_per_s"] / 1e9
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "attention_speed.json"), "w") as f:
            json.dump({"shape": args.shape, "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print(f"\n{args.shape}, bf16, batch 1, {'graph only' if args.no_compile else 'compiled + CUDA graph'}, "
          f"{torch.cuda.get_device_name()}, {time.time() - T0:.0f}s\n")
    print("| method | FFN target | attention inputs | measured FFN | measured qkv / o | tok/s | speed-up | ideal | GB/s | GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        att = r["attention_measured"]
        att_cell = f"{att.get('qkv', 0):.0%} / {att.get('o', 0):.0%}" if att else "—"
        print(f"| {r['method']} | {r['target']:.0%} | {r['attention'] or 0:.0%} | {r['measured']:.1%} | {att_cell} | "
              f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}× | {r['ideal']:.2f}× | {r['gb_per_s']:.0f} | {r['memory_gib']:.2f} |")


if __name__ == "__main__":
    main()
