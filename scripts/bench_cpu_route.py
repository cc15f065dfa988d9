"""CPU decode speed through the loop of countdown.generate (`Decoder`), one process, eager and compiled.

For one model, dtype and batch size and a list of configurations, each configuration decodes in every
mode asked (``eager``: the step as Python runs it; ``compiled``: ``DecodeOptions(compile=True)``, the C++
kernels inside the compiled step), and prints tokens/s of one row, × dense (against the first ``dense``
row of the same mode), achieved GB/s (weight bytes of one step × steps/s; the weights are read once per
step for the whole batch; for a sparse row the dense bytes, so it reads as "dense-equivalent") beside the
read bandwidth measured here, and the process's peak RSS so far. Medians of --repeats calls after one
warm-up (a compiled mode's warm-up includes its compile, reported separately).

    PYTHONPATH=. python scripts/bench_cpu_route.py --model smollm2 --dtype float32 --batch 1 \
        --configs dense,dense-noroute,teal:0.5:0.5,m-countdown:0.7,cats:0.5 --modes eager,compiled

A configuration is ``method:sparsity[:attention]`` (attention: input sparsity of the attention
projections, TEAL model-wide), or ``dense`` / ``dense-noroute`` (plain F.linear, the baseline before
issue 26: ``DecodeOptions(cpu_linears=False)``). ``d-countdown`` needs ``--predictors FILE`` (trained for its
sparsity by ``countdown train-predictors``; the predictor's own bytes are read every step and counted in
its time). Run it on a quiet machine: on a loaded one the
multi-threaded kernels wait on descheduled threads and every figure is noise.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import countdown
from countdown.data import calibration_text
from countdown.decode import Decoder
from countdown.kernels import cpu
from countdown.loading import load
from countdown.models import step_weight_bytes
from countdown.predictor import load_predictors
from countdown.speed import read_bandwidth_gbs

MODES = ("eager", "compiled")


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--configs", default="dense,dense-noroute,teal:0.5:0.5,m-countdown:0.7,cats:0.5")
    ap.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--predictors", default=None, help="saved predictors for d-countdown (countdown train-predictors)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        ap.error(f"--modes takes {MODES}, got {args.modes!r}")
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.time()
    model, tok = load(args.model, device="cpu", dtype=args.dtype)
    print(f"loaded {args.model} {args.dtype} in {time.time() - t0:.0f}s; {torch.get_num_threads()} threads; "
          f"batch {args.batch}", flush=True)
    print(f"C++ kernels: {cpu.extension_reason() or 'ready'} ({cpu.build_seconds():.1f}s to build or load)", flush=True)
    text = "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n"
    prompt = tok([text] * args.batch, return_tensors="pt").input_ids
    calib = tok(calibration_text(), return_tensors="pt").input_ids[:, : args.calib_tokens]
    calib = calib[:, : (calib.shape[1] // 256) * 256].reshape(-1, 256)
    nbytes = step_weight_bytes(model)
    print(f"read bandwidth {read_bandwidth_gbs():.1f} GB/s (sum over 1 GiB); {nbytes / 1e6:.0f} MB of weights a step; "
          f"peak RSS {peak_rss_mb():.0f} MB", flush=True)
    print(f"{'config':22s} {'mode':9s} {'tok/s':>8s} {'x dense':>8s} {'GB/s':>6s} {'peak RSS':>9s}  warm-up  runs", flush=True)

    first: dict[str, float] = {}
    for config in args.configs.split(","):
        method, *rest = config.split(":")
        if method not in ("dense", "dense-noroute"):
            sparsity, attention = float(rest[0]), (float(rest[1]) if len(rest) > 1 else None)
            predictors = None
            if method == "d-countdown":
                if not args.predictors:
                    ap.error("d-countdown needs --predictors FILE (countdown train-predictors ... -o FILE)")
                predictors = load_predictors(model, args.predictors)
            countdown.sparsify(model, method, sparsity, calibration=calib, attention=attention, progress=False,
                               predictors=predictors)
        for mode in modes:
            torch._dynamo.reset()  # each compiled decoder traces its own model state
            options = countdown.DecodeOptions(cpu_linears=method != "dense-noroute", compile=mode == "compiled")
            decoder = Decoder(model, prompt.shape[1] + args.new_tokens, batch_size=args.batch, options=options)
            t = time.time()
            decoder.generate(prompt, args.new_tokens)  # warm-up (and the compile)
            warm = time.time() - t
            runs = [decoder.generate(prompt, args.new_tokens).tokens_per_second for _ in range(args.repeats)]
            tps = statistics.median(runs)
            if method == "dense":
                first.setdefault(mode, tps)
            ratio = tps / first[mode] if mode in first else float("nan")
            print(f"{config:22s} {mode:9s} {tps:8.2f} {ratio:8.2f} {nbytes * tps / 1e9:6.1f} {peak_rss_mb():7.0f}MB"
                  f"  {warm:6.1f}s  {[round(r, 2) for r in runs]}", flush=True)
        if method not in ("dense", "dense-noroute"):
            countdown.unsparsify(model)


if __name__ == "__main__":
    main()
