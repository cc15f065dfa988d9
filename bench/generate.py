"""Generation speed on the GPU: plain ``model.generate`` against ``countdown.generate`` (CUDA-graph loop).

    PYTHONPATH=. python bench/generate.py                       # Llama-3-8B shape, bf16, batches 1-16
    PYTHONPATH=. python bench/generate.py --shape smollm2-135m --device cpu --dtype float32 --batches 1,2 \
        --new 8 --hf-new 4 --no-compile                          # a quick dry run on the CPU

A random-weight model of the shape (decode speed depends on bytes and launches, not on the values);
prompts of ``--prompt`` random tokens. First a check that greedy tokens equal ``model.generate``'s at
batch 1 and at a left-padded batch of 4 (the fraction of the first 32 new tokens that agree: bf16
argmax ties may make random weights diverge later). Then decode tokens/s (per row, and for the
batch) after warm-up, median of ``--repeats``: plain ``model.generate`` greedy (decode only: the time
of N new tokens minus the time of 1, over N - 1; its speed per step does not depend on N, so it runs
fewer tokens), ``countdown.generate`` greedy and sampling (top_p 0.9), without and with
``torch.compile``, and the peak GPU memory of each; before the compiled rows, transformers' own
fast recipe (``cache_implementation="static"``, which compiles with ``mode="reduce-overhead"``), with
the error it gives if it fails. Each phase stops starting new work past ``--deadline`` seconds.
(The 2026-11-23 run in bench/results used an earlier order: compiled rows first, so the deadline
left no time for the transformers recipe.)
Last lines: the table. With $OUT set, generate.json is written there after every phase.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback

import torch

from countdown.generation import decoder_for, generate
from countdown.loading import random_model
from countdown.speed import model_bytes

T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_reset():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def error_text(e: BaseException) -> str:
    tail = "".join(traceback.format_exception(e))[-1500:]
    return f"{type(e).__name__}: {e}"[:600] + "\n--- traceback tail ---\n" + tail


def prompts(vocab: int, rows: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (rows, length), generator=g)


def hf_generate(model, ids, n, mask=None, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, **kw)


def check(model, args, dev) -> dict:
    """Greedy tokens of countdown.generate vs model.generate: batch 1, and left-padded batch 4."""
    n = 32
    out = {}
    ids = prompts(model.config.vocab_size, 1, args.prompt).to(dev)
    ref = hf_generate(model, ids, n)[:, args.prompt:]
    ours = generate(model, ids, max_new_tokens=n, eos_token_id=[])[:, args.prompt:]
    out["batch1_match"] = float((ref == ours).float().mean())
    lengths = [args.prompt, args.prompt * 3 // 4, args.prompt // 2, args.prompt // 3]
    ids = prompts(model.config.vocab_size, 4, args.prompt, seed=2)
    mask = torch.zeros_like(ids)
    for r, length in enumerate(lengths):
        mask[r, args.prompt - length:] = 1
    ids, mask = ids.masked_fill(mask == 0, 0).to(dev), mask.to(dev)
    ref = hf_generate(model, ids, n, mask)[:, args.prompt:]
    ours = generate(model, ids, mask, max_new_tokens=n, eos_token_id=[])[:, args.prompt:]
    out["padded_batch4_lengths"] = lengths
    out["padded_batch4_match_per_row"] = [float(x) for x in (ref == ours).float().mean(dim=1)]
    out["padded_batch4_first_divergence"] = [int((r != o).nonzero()[0]) if bool((r != o).any()) else n
                                             for r, o in zip(ref, ours)]
    return out


def time_hf(model, ids, args) -> dict:
    """Plain model.generate (dynamic cache, eager): decode tokens/s per row from N and 1 new tokens."""
    hf_generate(model, ids, args.hf_new)  # warm-up (a 2-token warm-up left the first timed run 2x slow)
    t1, tn = [], []
    for _ in range(args.repeats):
        sync(); t = time.perf_counter(); hf_generate(model, ids, 1); sync(); t1.append(time.perf_counter() - t)
        sync(); t = time.perf_counter(); hf_generate(model, ids, args.hf_new); sync(); tn.append(time.perf_counter() - t)
    runs = [(args.hf_new - 1) / (b - a) for a, b in zip(t1, tn)]
    return {"tokens_per_s": statistics.median(runs), "runs": runs, "prefill_ms": 1e3 * statistics.median(t1),
            "new_tokens": args.hf_new}


def time_ours(model, ids, args, compile: bool, sample: bool) -> dict:
    """countdown's loop through the decoder countdown.generate caches for this batch and length."""
    decoder = decoder_for(model, ids.shape[0], ids.shape[1] + args.new, compile)
    kw = dict(eos_token_id=None)
    if sample:
        kw.update(do_sample=True, top_p=0.9, generator=torch.Generator(device=ids.device).manual_seed(0))
    t = time.perf_counter()
    first = decoder.generate(ids, 8, **kw)  # warm-up: capture (and compile)
    warm_s = time.perf_counter() - t
    results = [decoder.generate(ids, args.new, **kw) for _ in range(args.repeats)]
    runs = [r.tokens_per_second for r in results]
    tps = statistics.median(runs)
    return {"tokens_per_s": tps, "batch_tokens_per_s": tps * ids.shape[0], "runs": runs,
            "prefill_ms": 1e3 * statistics.median(r.prefill_seconds for r in results),
            "warmup_capture_s": warm_s, "max_len": decoder.max_len, "tokens": results[0].tokens, "first": first}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--compile-batches", default="1,16", help="in the order tried while time lasts (~50 s each on 8B)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--hf-new", type=int, default=32, help="new tokens per timed plain model.generate call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--deadline", type=float, default=370.0, help="seconds after start: start nothing new after")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-hf-static", action="store_true")
    args = p.parse_args()
    for name in ("recompile_limit", "cache_size_limit"):  # one static compile per batch size
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)

    out_dir = os.environ.get("OUT")
    report: dict = {"args": vars(args), "torch": torch.__version__}
    import transformers
    report["transformers"] = transformers.__version__

    def save():
        if out_dir:
            with open(os.path.join(out_dir, "generate.json"), "w") as f:
                json.dump(report, f, indent=1, default=str)

    def left() -> float:
        return args.deadline - (time.perf_counter() - T0)

    if args.device == "cuda":
        report["device"] = torch.cuda.get_device_name()
    model = random_model(args.shape, args.device, args.dtype)
    dev = next(model.parameters()).device
    nb = model_bytes(model)
    report["weight_bytes_per_step"] = nb.weights
    report["kv_bytes_per_position"] = nb.kv_per_position
    log(f"model {args.shape} on {dev}: {nb.weights / 1e9:.2f} GB of weights read per decode step")
    try:
        report["check"] = check(model, args, dev)
    except Exception as e:  # keep timing even if the check breaks
        report["check"] = {"error": error_text(e)}
    log("check:", {k: v for k, v in report["check"].items()})
    save()

    batches = [int(b) for b in args.batches.split(",")]
    rows: list[dict] = []
    report["rows"] = rows
    greedy_tokens: dict[int, torch.Tensor] = {}

    def add(kind: str, batch: int, fn) -> None:
        if left() <= 0:
            rows.append({"kind": kind, "batch": batch, "skipped": "deadline"})
            return
        peak_reset()
        try:
            r = fn()
            r["peak_gib"] = peak_gib()
        except Exception as e:
            r = {"error": error_text(e)}
            log(f"{kind} batch {batch} FAILED:", r["error"][:400])
        tokens = r.pop("tokens", None)
        r.pop("first", None)
        if tokens is not None and kind == "countdown greedy":
            greedy_tokens[batch] = tokens
        if tokens is not None and kind == "countdown greedy compiled" and batch in greedy_tokens:
            r["match_uncompiled_first32"] = float((tokens[:, args.prompt:args.prompt + 32]
                                                   == greedy_tokens[batch][:, args.prompt:args.prompt + 32]).float().mean())
        rows.append({"kind": kind, "batch": batch, **r})
        log(kind, batch, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "runs"})
        save()

    for b in batches:
        ids = prompts(model.config.vocab_size, b, args.prompt, seed=10 + b).to(dev)
        add("model.generate greedy", b, lambda: time_hf(model, ids, args))
    for b in batches:
        ids = prompts(model.config.vocab_size, b, args.prompt, seed=10 + b).to(dev)
        add("countdown greedy", b, lambda: time_ours(model, ids, args, False, False))
        add("countdown top_p=0.9", b, lambda: time_ours(model, ids, args, False, True))
    if not args.no_hf_static:
        hf_static(model, args, dev, report, left, save)
    compile_batches = [int(b) for b in args.compile_batches.split(",") if int(b) in batches]
    if not args.no_compile:
        for b in compile_batches:
            ids = prompts(model.config.vocab_size, b, args.prompt, seed=10 + b).to(dev)
            if left() <= 50:  # a compile takes ~45 s on the 8B shape: skip the pair, not half of it
                rows.extend({"kind": k, "batch": b, "skipped": "deadline"}
                            for k in ("countdown greedy compiled", "countdown top_p=0.9 compiled"))
                continue
            add("countdown greedy compiled", b, lambda: time_ours(model, ids, args, True, False))
            add("countdown top_p=0.9 compiled", b, lambda: time_ours(model, ids, args, True, True))
    save()
    print_table(report, args)


def hf_static(model, args, dev, report, left, save) -> None:
    """transformers' documented recipe: a static cache, the forward compiled with reduce-overhead
    (cudagraph trees); then, if that fails and time is left, the same without CUDA graphs."""
    from transformers import CompileConfig

    attempts = [("hf_static", {}),
                ("hf_static_no_cudagraphs", {"compile_config": CompileConfig(mode="default")})]
    ids = prompts(model.config.vocab_size, 1, args.prompt, seed=11).to(dev)
    for name, extra in attempts:
        if dev.type != "cuda" or left() < 90:
            report[name] = {"skipped": "no CUDA" if dev.type != "cuda" else "deadline"}
            continue
        res: dict = {}
        kw = dict(cache_implementation="static", **extra)
        try:
            t = time.perf_counter()
            ref = hf_generate(model, ids, 16, **kw)
            res["first_call_s"] = time.perf_counter() - t
            runs = []
            for _ in range(args.repeats):
                sync(); t = time.perf_counter(); hf_generate(model, ids, 1, **kw); sync()
                a = time.perf_counter() - t
                sync(); t = time.perf_counter(); hf_generate(model, ids, 48, **kw); sync()
                runs.append(47 / (time.perf_counter() - t - a))
            res.update(tokens_per_s=statistics.median(runs), runs=runs, works=True,
                       first16=ref[0, args.prompt:].tolist())
        except Exception as e:
            res.update(works=False, error=error_text(e))
        report[name] = res
        log(name, {k: v for k, v in res.items() if k != "first16"})
        save()
        if res.get("works"):
            break


def print_table(report: dict, args) -> None:
    print(f"\n{report.get('device', args.device)} · {args.shape} {args.dtype} · prompt {args.prompt} · "
          f"{args.new} new tokens (plain generate: {args.hf_new}) · median of {args.repeats} after warm-up")
    print(f"check: {json.dumps(report.get('check'))[:600]}")
    for name in ("hf_static", "hf_static_no_cudagraphs"):
        hs = report.get(name, {})
        print(f"{name}:", f"{hs.get('tokens_per_s', float('nan')):.1f} tok/s batch 1 (first call "
              f"{hs.get('first_call_s', float('nan')):.0f} s)" if hs.get("works") else
              (hs.get("error", "")[:300] or hs.get("skipped", "not run")))
    print("| loop | batch | tok/s per row | tok/s batch | prefill ms | warm-up+capture s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        if "tokens_per_s" not in r:
            print(f"| {r['kind']} | {r['batch']} | {r.get('skipped') or 'ERROR ' + r.get('error', '')[:80]} |||||")
            continue
        tps = r["tokens_per_s"]
        print(f"| {r['kind']} | {r['batch']} | {tps:.1f} | {tps * r['batch']:.0f} | {r['prefill_ms']:.1f} | "
              f"{r.get('warmup_capture_s', float('nan')):.1f} | {r['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
