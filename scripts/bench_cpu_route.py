"""CPU decode speed through the loop of countdown.generate (`Decoder`), one process: dense through the CPU route first, dense
without the route's GEMV (``DecodeOptions(cpu_linears=False)``: plain F.linear, the baseline before issue 26), then each configuration;
every ratio against the first dense row. Medians of --repeats calls after one warm-up.

    PYTHONPATH=. python scripts/bench_cpu_route.py --model qwen2.5-coder-1.5b --dtype bfloat16 \
        --configs dense,dense-noroute,teal:0.5:0.5,m-countdown:0.7,cats:0.5,dense --new-tokens 32

A configuration is ``method:sparsity[:attention]`` (attention: input sparsity of the attention
projections, TEAL model-wide), or ``dense`` / ``dense-noroute``. GB/s: weight bytes of one step (the
input embedding excluded unless tied to the LM head) × tokens/s, beside the read bandwidth measured here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import countdown
from countdown.decode import Decoder
from countdown.data import calibration_text
from countdown.kernels import cpu
from countdown.loading import load
from countdown.speed import read_bandwidth_gbs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--configs", default="dense,dense-noroute,teal:0.5:0.5,m-countdown:0.7,cats:0.5,dense")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    args = ap.parse_args()

    t0 = time.time()
    model, tok = load(args.model, device="cpu", dtype=args.dtype)
    print(f"loaded {args.model} {args.dtype} in {time.time() - t0:.0f}s; {torch.get_num_threads()} threads", flush=True)
    print(f"C++ kernels: {cpu.extension_reason() or 'ready'} ({cpu.build_seconds():.1f}s to build or load)", flush=True)
    prompt = tok("def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n", return_tensors="pt").input_ids
    calib = tok(calibration_text(), return_tensors="pt").input_ids[:, : args.calib_tokens]
    calib = calib[:, : (calib.shape[1] // 256) * 256].reshape(-1, 256)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    step_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if head is not emb:
        step_bytes -= emb.numel() * emb.element_size()  # one embedding row per token
    print(f"read bandwidth {read_bandwidth_gbs():.1f} GB/s (sum over 1 GiB); {step_bytes / 1e6:.0f} MB of weights a step",
          flush=True)

    first = None
    for config in args.configs.split(","):
        method, *rest = config.split(":")
        if method not in ("dense", "dense-noroute"):
            sparsity, attention = float(rest[0]), (float(rest[1]) if len(rest) > 1 else None)
            t = time.time()
            countdown.sparsify(model, method, sparsity, calibration=calib, attention=attention, progress=False)
            print(f"  sparsified {config} in {time.time() - t:.0f}s", flush=True)
        # the loop behind countdown.generate; decode steps only (prefill excluded), as `countdown bench` times them
        options = countdown.DecodeOptions(cpu_linears=method != "dense-noroute")
        decoder = Decoder(model, prompt.shape[1] + args.new_tokens, options=options)
        decoder.generate(prompt, args.new_tokens)  # warm-up
        runs = [decoder.generate(prompt, args.new_tokens).tokens_per_second for _ in range(args.repeats)]
        tps = statistics.median(runs)
        first = first or tps
        gbs = f"{step_bytes * tps / 1e9:5.1f} GB/s" if method.startswith("dense") else ""
        print(f"{config:24s} {tps:7.2f} tok/s  x{tps / first:5.2f}  {gbs}  runs {[round(r, 2) for r in runs]}",
              flush=True)
        if method not in ("dense", "dense-noroute"):
            countdown.unsparsify(model)


if __name__ == "__main__":
    main()
