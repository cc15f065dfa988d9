"""End-to-end decode speed on the GPU: tokens/s of dense and sparsified models through one fast loop.

    PYTHONPATH=. python bench/e2e.py                          # every shape, every method, 50/70/90%
    PYTHONPATH=. python bench/e2e.py --shapes llama-3-8b --methods m-countdown,d-countdown --no-compile

Models are built from the shapes of Llama-3-8B, Llama-2-7B and SmolLM2-135M with random bf16 weights:
decode speed at batch 1 depends on the bytes read (shapes, and how many FFN neurons pass the
threshold), not on the weights' values. The real SmolLM2 weights cannot reach the GPU machine (no
internet there; the file is larger than what travels with the working tree); `countdown bench` runs
the real model wherever it is installed. Thresholds are calibrated on random token windows, so the
measured sparsity (printed, from the generated tokens) is what the timing had.

First: measured copy bandwidth (bytes read + written by a 2 GiB device-to-device copy), the
bytes-bound ceiling each dense tokens/s is compared to, and a check that the kernel path gives the
reference path's logits on a decode step and that the CUDA-graph loop gives model.generate's greedy
tokens. Last lines: the table. With $OUT set, e2e.json and e2e.md are written there.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict

import torch

import countdown
from countdown.decode import Decoder
from countdown.ffn import sparse_modules
from countdown.loading import random_inputs, random_model
from countdown.cli import BENCH_METHODS
from countdown.predictor import random_predictors
from countdown.speed import SpeedPoint, measure_speed, model_bytes, speed_markdown

SHAPES = ("smollm2-135m", "llama-2-7b", "llama-3-8b")
METHODS = ",".join(BENCH_METHODS)


def log(*a):
    print(*a, flush=True)


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written (median of 20)."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=400, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def check(shape: str) -> dict:
    """Kernel path vs reference on one decode step; CUDA-graph loop vs model.generate, both dense."""
    model = random_model(shape, "cuda", "bfloat16")
    prompt, calib = random_inputs(model, 32, 4, 128, seed=1)
    n = 32
    ref = model.generate(prompt.cuda(), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    fast = Decoder(model, max_len=64).generate(prompt, n).tokens
    out = {"graph_loop_equals_generate": float((ref.cpu()[0, 32:] == fast[0, 32:]).float().mean())}
    for method in BENCH_METHODS:
        preds = random_predictors(model) if method == "d-countdown" else None
        countdown.sparsify(model, method, 0.7, calibration=calib, predictors=preds, progress=False)
        errs_kernel, errs_ref = [], []
        with torch.no_grad():
            for module in sparse_modules(model)[:6]:  # FFNs on a fresh decode-token input each
                x = torch.randn(1, 1, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
                # the truth: the reference path on the same weights and mask thresholds in float32
                exact = copy.deepcopy(module).float()
                exact.kernels = "off"
                truth = exact(x.float())
                module.kernels = "off"
                ref = module(x).float()
                module.kernels = "auto"
                assert module.kernel_skip_reason(x) is None
                errs_kernel.append(float((module(x).float() - truth).norm() / truth.norm()))
                errs_ref.append(float((ref - truth).norm() / truth.norm()))
                del exact
        # a score within rounding of the threshold can flip its neuron: bf16 reference and fp32-scored
        # kernel then differ by whole neurons, so both are compared with the float32 truth
        out[f"{method}_kernel_vs_fp32"] = max(errs_kernel)
        out[f"{method}_bf16_reference_vs_fp32"] = max(errs_ref)
        countdown.unsparsify(model)
    del model
    torch.cuda.empty_cache()
    return out


def run_shape(shape: str, methods: list[str], sparsities: list[float], args) -> dict:
    t0 = time.time()
    model = random_model(shape, "cuda", "bfloat16")
    prompt, calib = random_inputs(model, args.prompt_len, 4)
    nb = model_bytes(model)
    log(f"{shape}: weights read per token {nb.weights / 1e9:.2f} GB, FFN {nb.ffn / nb.weights:.0%} of them; built in {time.time() - t0:.0f}s")
    preds = random_predictors(model) if "d-countdown" in methods else None
    points = measure_speed(model, methods, sparsities, prompt, calib, new_tokens=args.new_tokens, repeats=args.repeats,
                           predictors_for=(lambda s: preds), compile=args.compile, log=log)
    del model, preds
    torch.cuda.empty_cache()
    log(f"{shape} done in {time.time() - t0:.0f}s")
    return {"shape": shape, "points": [asdict(p) for p in points], "bytes": asdict(nb)}


def run_real(path: str, text_file: str, methods: list[str], sparsities: list[float], args) -> dict:
    """The real SmolLM2 (a GGUF file brought to the machine) on real text: tokens/s and how many
    greedy tokens stay equal to the dense model's."""
    from countdown.data import first_tokens, read_text_file
    from countdown.loading import load
    from countdown.predictor import PredictorCache

    t0 = time.time()
    model, tok = load(path, device="cuda", dtype="bfloat16")
    text = read_text_file(text_file)
    calib = first_tokens(tok, text, 16 * 256, 256)
    prompt = first_tokens(tok, text[len(text) // 2:], args.prompt_len, args.prompt_len)  # not in the calibration part
    predictors_for = PredictorCache(model, calib, log=log, progress=False)
    points = measure_speed(model, methods, sparsities, prompt, calib, new_tokens=args.new_tokens, repeats=args.repeats,
                           predictors_for=predictors_for, compile=args.compile, log=log)
    log(f"real SmolLM2 done in {time.time() - t0:.0f}s")
    return {"shape": "smollm2-135m (real weights)", "points": [asdict(p) for p in points], "bytes": asdict(model_bytes(model))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile the decode step before capture (default; --no-compile: graph only)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--real-gguf", default="", help="also run the real model from this GGUF file (needs the gguf package)")
    ap.add_argument("--text", default="", help="with --real-gguf: a UTF-8 text file for calibration and the prompt")
    args = ap.parse_args()
    if args.compile:  # one compile per method (its FFN modules differ); sparsities share it
        torch._dynamo.config.recompile_limit = 64
    import transformers
    import triton

    log(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"transformers {transformers.__version__}")
    bandwidth = copy_bandwidth()
    log(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s")
    result = {"device": torch.cuda.get_device_name(), "copy_gb_per_s": bandwidth, "args": vars(args), "shapes": []}
    if not args.no_check:
        result["check"] = check("smollm2-135m")
        log("check:", json.dumps(result["check"]))
    methods = [m for m in args.methods.split(",") if m]
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    tables = []
    jobs = [s for s in args.shapes.split(",") if s] + (["real"] if args.real_gguf else [])
    for shape in jobs:
        try:
            if shape == "real":
                r = run_real(args.real_gguf, args.text, methods, sparsities, args)
            else:
                r = run_shape(shape, methods, sparsities, args)
        except Exception as err:  # keep the other shapes' results
            log(f"{shape} FAILED: {type(err).__name__}: {err}")
            import traceback

            traceback.print_exc()
            continue
        result["shapes"].append(r)
        dense = r["points"][0]
        frac = dense["gb_per_s"] / bandwidth
        title = (f"{r['shape']}: bf16, batch 1, prompt {args.prompt_len} → {args.new_tokens}, CUDA graph"
                 f"{' + compile' if args.compile else ''}; dense at {frac:.0%} of the copy bandwidth")
        tables.append(speed_markdown([SpeedPoint(**p) for p in r["points"]], title))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "e2e.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out, "e2e.md"), "w") as f:
            f.write("\n".join(tables))
    log("\n" + "\n".join(tables))


if __name__ == "__main__":
    main()
