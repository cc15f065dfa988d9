"""Where the time of one decode step goes: GPU kernel time by kernel, for dense and sparse models.

    PYTHONPATH=. python bench/profile_step.py                       # Llama-3-8B shape, dense, M-70%, D-90%
    PYTHONPATH=. python bench/profile_step.py --shape llama-2-7b --no-compile
    PYTHONPATH=. python bench/profile_step.py --batch 2 --configs dense,m-countdown:0.9
    PYTHONPATH=. python bench/profile_step.py --fuse-qkv --configs dense,teal:0.5:0.5,m-countdown:0.7:0.5

A config is ``method:sparsity[:attention-input sparsity]``. ``--fuse-qkv``: q, k and v in one launch in
every configuration (`countdown.fuse_qkv` for dense q/k/v; sparse ones are fused by default).

Builds the random-weight model of the shape (bf16), captures the decode step as `bench/e2e.py` does
(compiled by default), replays it under torch.profiler and sums each kernel's GPU time per step. The
sum of kernel times is compared with the wall time per step (the gap is idle GPU between kernels) and
with the bytes floor. The last lines are the table of the heaviest kernels per configuration; with
$OUT set, profile.json holds every kernel.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import torch

import countdown
from countdown.decode import Decoder
from countdown.loading import random_inputs, random_model
from countdown.predictor import random_predictors
from countdown.speed import model_bytes


def profile_config(model, prompt, steps: int, compile: bool) -> dict:
    decoder = Decoder(model, max_len=prompt.shape[-1] + steps + 8, batch_size=prompt.shape[0], compile=compile)
    decoder.generate(prompt, 8)  # capture
    result = decoder.generate(prompt, steps + 1)
    wall_ms = result.decode_seconds / steps * 1e3
    decoder.generate(prompt, 2)  # back to a fresh cache; then profile `steps` replays
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder._graphs["greedy"].replay()
        torch.cuda.synchronize()
    source = "graph replay"
    if not any(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events()):
        # the profiler saw no kernels inside the graph: profile the same step run without the graph
        source = "step without graph (same kernels, launch gaps differ)"
        decoder.generate(prompt, 2)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                decoder._step("greedy")
            torch.cuda.synchronize()
    per_kernel = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name][0] += evt.time_range.elapsed_us() / steps / 1e3  # ms per step
            per_kernel[evt.name][1] += 1
    kernels = sorted(([name, ms, n // steps] for name, (ms, n) in per_kernel.items()), key=lambda r: -r[1])
    return {"source": source, "wall_ms": wall_ms, "kernel_ms": sum(r[1] for r in kernels), "launches": sum(r[2] for r in kernels),
            "kernels": kernels}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--configs", default="dense,m-countdown:0.7,d-countdown:0.9",
                    help="comma-separated method:sparsity[:attention] (dense alone for the baseline)")
    ap.add_argument("--fuse-qkv", action="store_true", help="q, k and v in one launch everywhere")
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64
    model = random_model(args.shape, "cuda", "bfloat16")
    prompt, calib = random_inputs(model, 128, 4, batch=args.batch)
    nb = model_bytes(model)
    floor_ms = nb.per_token(128 + args.steps / 2) / 3.0e12 * 1e3
    results = {}
    configs = []
    for item in args.configs.split(","):
        method, *rest = item.split(":")
        if method == "dense":
            configs.append(("dense", None, 0.0, None))
            continue
        att = float(rest[1]) if len(rest) > 1 else None
        name = f"{method} {float(rest[0]):.0%}" + (f" + attention {att:.0%}" if att is not None else "")
        configs.append((name, method, float(rest[0]), att))
    for name, method, s, att in configs:
        if method:
            preds = random_predictors(model) if method == "d-countdown" else None
            countdown.sparsify(model, method, s, calibration=calib, predictors=preds, attention=att, progress=False)
        if args.fuse_qkv and att is None:
            countdown.fuse_qkv(model)
        results[name] = profile_config(model, prompt, args.steps, args.compile)
        if args.fuse_qkv and att is None:
            countdown.unfuse_qkv(model)
        if method:
            countdown.unsparsify(model)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"profile-b{args.batch}.json"), "w") as f:
            json.dump({"shape": args.shape, "batch": args.batch, "compile": args.compile, "fuse_qkv": args.fuse_qkv, "dense_floor_ms": floor_ms, "results": results}, f, indent=1)
    print(f"\n{args.shape}, bf16, batch {args.batch}, {'compiled + ' if args.compile else ''}CUDA graph; dense bytes floor at 3.0 TB/s: {floor_ms:.2f} ms")
    for name, r in results.items():
        print(f"\n{name}: wall {r['wall_ms']:.3f} ms/step, kernels {r['kernel_ms']:.3f} ms, "
              f"{r['launches']} launches/step, idle {r['wall_ms'] - r['kernel_ms']:.3f} ms ({r['source']})")
        print("| ms/step | launches | kernel |\n|---|---|---|")
        for kname, ms, n in r["kernels"][:12]:
            print(f"| {ms:.3f} | {n} | {kname[:90]} |")


if __name__ == "__main__":
    main()
