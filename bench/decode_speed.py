"""Speed where users run models (issue 11): generate routes, GPU memory, prefill, decode batches 1-16.

    PYTHONPATH=. python bench/decode_speed.py --part routes     # batch 1: every route, memory, prefill
    PYTHONPATH=. python bench/decode_speed.py --part batches    # batch 1/2/4/8/16 through the fast loop

Llama-3-8B shape, random bf16 weights (decode speed depends on bytes, not values), thresholds
calibrated on random token windows, D-COUNTDOWN with untrained predictors of the paper's size.
Dense and every method run in the same process on the same model object, sparsified with the
library's defaults (positions="decode": prefill dense, decode sparse; kernels="auto").

Part "routes" (batch 1, prompt 128, 256 new tokens, median of 3 after a warm-up):
  * fast loop: `countdown.decode.Decoder(compile=True)` decode tokens/s;
  * `countdown.generate(compile=True)`: whole-call tokens/s (prefill included) against the fast loop's
    whole-call tokens/s (prefill + decode);
  * plain `model.generate` (greedy, 32 new tokens: it is host-bound);
  * transformers' static-cache recipe (cache_implementation="static", forward compiled with
    mode="reduce-overhead"), dense only: tokens/s or the error it raises;
  * GPU memory allocated after sparsify; forward time of a 2048-token prompt (positions="decode" and
    "all").
Part "batches": the fast loop (CUDA graph; --compile-batches also compiles) at batch 1/2/4/8/16 for
dense, M-COUNTDOWN 70/90% and D-COUNTDOWN 90%. Prints Markdown tables last; JSON to $OUT.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from dataclasses import asdict

import torch

import countdown
from countdown.decode import Decoder
from countdown.loading import random_inputs, random_model
from countdown.predictor import random_predictors
from countdown.speed import SpeedPoint, measure_speed, model_bytes, speed_markdown

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.0f}s]", *a, flush=True)


def gib() -> float:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / 2**30


def cuda_ms(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sparsified(model, method, s, calib, preds, positions="decode"):
    if method != "dense":
        countdown.sparsify(model, method, s, calibration=calib, predictors=preds if method == "d-countdown" else None,
                           positions=positions, progress=False)
    return model


def hf_static_recipe(model, prompt, n) -> str:
    """tokens/s of transformers' documented fast recipe, or the error it raises."""
    try:
        forward = model.forward
        model.forward = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static", pad_token_id=0)
        model.generate(prompt, **kw)
        t = wall(lambda: model.generate(prompt, **kw), repeats=2)
        return f"{n / t:.1f} tokens/s"
    except Exception as err:  # the point is to record what users meet
        return f"fails: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    finally:
        model.forward = forward
        torch._dynamo.reset()


def routes(model, prompt, calib, preds, args) -> list[dict]:
    n, rows = args.new_tokens, []
    long_prompt = random_inputs(model, 2048, 1, seed=5)[0].cuda()
    for method, s in args.configs:
        row = {"method": method, "target": s}
        sparsified(model, method, s, calib, preds)
        row["memory_gib"] = gib()
        with torch.no_grad():
            row["prefill_2048_ms"] = cuda_ms(lambda: model(input_ids=long_prompt, use_cache=False, logits_to_keep=1))
        decoder = Decoder(model, max_len=prompt.shape[-1] + n, compile=True)
        decoder.generate(prompt, n)
        results = [decoder.generate(prompt, n) for _ in range(3)]
        row["fast_loop_tps"] = statistics.median(r.tokens_per_second for r in results)
        row["fast_loop_call_tps"] = statistics.median(n / (r.prefill_seconds + r.decode_seconds) for r in results)
        del decoder
        gen = lambda: countdown.generate(model, prompt.cuda(), max_new_tokens=n, eos_token_id=[], compile=True)  # noqa: E731
        row["countdown_generate_tps"] = n / wall(gen)
        hf = lambda: model.generate(prompt.cuda(), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)  # noqa: E731
        row["model_generate_tps"] = 32 / wall(hf, repeats=2)
        if method == "dense":
            row["hf_static_recipe"] = hf_static_recipe(model, prompt.cuda(), 64)
        countdown.generation.clear_cache(model)
        if method != "dense":
            countdown.unsparsify(model)
            countdown.sparsify(model, method, s, calibration=calib, predictors=preds if method == "d-countdown" else None,
                               positions="all", progress=False)
            with torch.no_grad():
                row["prefill_2048_ms_all_positions"] = cuda_ms(
                    lambda: model(input_ids=long_prompt, use_cache=False, logits_to_keep=1))
            countdown.unsparsify(model)
        rows.append(row)
        log(json.dumps(row))
    return rows


def routes_table(rows: list[dict], dense_floor_tps: float) -> str:
    d = rows[0]
    out = ["| route / figure | dense | " + " | ".join(f"{r['method']} {r['target']:.0%}" for r in rows[1:]) + " |",
           "|---|---|" + "---|" * (len(rows) - 1)]

    def line(name, key, fmt, ratio=True):
        cells = [fmt(d[key])] + [(f"{r[key] / d[key]:.2f}× ({fmt(r[key])})" if ratio else fmt(r[key])) for r in rows[1:]]
        out.append(f"| {name} | " + " | ".join(cells) + " |")

    line("fast loop (Decoder, compile), decode tok/s", "fast_loop_tps", lambda v: f"{v:.1f}")
    out[-1] = out[-1].replace(f"| {d['fast_loop_tps']:.1f} |",
                              f"| {d['fast_loop_tps']:.1f} ({d['fast_loop_tps'] / dense_floor_tps:.0%} of the byte floor) |", 1)
    line("countdown.generate(compile) whole call tok/s", "countdown_generate_tps", lambda v: f"{v:.1f}")
    out.append("| countdown.generate / fast loop (whole call) | " + " | ".join(
        f"{r['countdown_generate_tps'] / r['fast_loop_call_tps']:.0%}" for r in rows) + " |")
    line("plain model.generate tok/s", "model_generate_tps", lambda v: f"{v:.1f}")
    out.append(f"| transformers static recipe | {d.get('hf_static_recipe', '—')} |" + " — |" * (len(rows) - 1))
    line("GPU memory after sparsify (GiB)", "memory_gib", lambda v: f"{v:.2f}")
    line("forward of a 2048-token prompt, ms (positions=decode)", "prefill_2048_ms", lambda v: f"{v:.1f}")
    out.append("| same, positions=all (every prompt token sparse) | — | " + " | ".join(
        f"{d['prefill_2048_ms'] / r['prefill_2048_ms_all_positions']:.2f}× of dense speed" for r in rows[1:]) + " |")
    return "\n".join(out) + "\n"


def batches(model, calib, preds, args) -> list[dict]:
    out = []
    for b in args.batch_sizes:
        prompt, _ = random_inputs(model, args.prompt_len, 1, batch=b, seed=b)
        for compile in ([False, True] if b in args.compile_batches else [False]):
            points = measure_speed(model, ["m-countdown", "d-countdown"], [0.7, 0.9], prompt, calib,
                                   new_tokens=args.new_tokens, repeats=3, predictors_for=lambda s: preds,
                                   compile=compile, log=log)
            points = [p for p in points if (p.method, p.target) != ("d-countdown", 0.7)]
            out.append({"batch": b, "compile": compile, "points": [asdict(p) for p in points]})
            log(f"batch {b} compile={compile}: " + ", ".join(f"{p.method} {p.target:.0%} {p.speedup:.2f}x" for p in points))
    return out


def batches_table(runs: list[dict]) -> str:
    out = ["| batch | route | dense tok/s per seq | M-COUNTDOWN 70% | M-COUNTDOWN 90% | D-COUNTDOWN 90% |",
           "|---|---|---|---|---|---|"]
    for r in runs:
        pts = {(p["method"], p["target"]): p for p in r["points"]}
        d = pts[("dense", 0.0)]
        cells = [f"{pts[k]['speedup']:.2f}× ({pts[k]['tokens_per_s']:.1f})" for k in
                 (("m-countdown", 0.7), ("m-countdown", 0.9), ("d-countdown", 0.9)) if k in pts]
        route = "graph + compile" if r["compile"] else "graph"
        out.append(f"| {r['batch']} | {route} | {d['tokens_per_s']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("routes", "batches"), required=True)
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4, 8, 16])
    ap.add_argument("--configs", type=lambda v: [(c.split(":")[0], float(c.split(":")[1])) for c in v.split(",")],
                    default=[("dense", 0.0), ("m-countdown", 0.7), ("d-countdown", 0.9)],
                    help="routes part: method:sparsity list (the table needs dense first)")
    ap.add_argument("--compile-batches", type=lambda v: [int(x) for x in v.split(",") if x], default=[])
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    model = random_model(args.shape, "cuda", "bfloat16")
    prompt, calib = random_inputs(model, args.prompt_len, 4)
    preds = random_predictors(model)  # kept on the CPU: sparsify puts the one GPU copy in place
    preds.layers = [{k: v.cpu() for k, v in layer.items()} for layer in preds.layers]
    nb = model_bytes(model)
    floor_tps = 3.0e12 / nb.per_token(args.prompt_len + args.new_tokens / 2)
    log(f"{args.shape}: {nb.weights / 1e9:.2f} GB of weights per step; byte floor {floor_tps:.0f} tok/s at 3.0 TB/s; "
        f"{torch.cuda.get_device_name()}")
    result = {"shape": args.shape, "part": args.part, "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "floor_tps": floor_tps}
    if args.part == "routes":
        result["rows"] = rows = routes(model, prompt, calib, preds, args)
        table = routes_table(rows, floor_tps) if rows[0]["method"] == "dense" else json.dumps(rows, indent=1)
    else:
        result["runs"] = runs = batches(model, calib, preds, args)
        table = batches_table(runs) + "\n" + "\n".join(
            speed_markdown([SpeedPoint(**p) for p in r["points"]],
                           f"batch {r['batch']}, {'compiled' if r['compile'] else 'graph only'}") for r in runs)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"decode_speed_{args.part}.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{args.shape}, bf16, {torch.cuda.get_device_name()}, total {time.time() - T0:.0f}s\n")
    print(table)


if __name__ == "__main__":
    main()
