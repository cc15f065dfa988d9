"""Why two `Decoder` instances of one configuration decode at different speeds (issue 13).

    PYTHONPATH=. python bench/instance_spread.py                          # TEAL 50% model-wide, 4 instances
    PYTHONPATH=. python bench/instance_spread.py --configs dense,teal:0.5:0.5 --instances 3 --rounds 2
    PYTHONPATH=. python bench/instance_spread.py --configs teal:0.5:0.5,teal:0.5:0.5+pr --profile

A config is ``dense`` (q/k/v fused, the best dense we have) or ``method:sparsity[:attention-input
sparsity]`` (without an attention sparsity q/k/v are fused and dense, as in ``dense``), either followed by extras: ``+pr`` (`decode.PERSISTENT_ROW_REDUCTIONS`), ``+mk``
(Inductor's ``triton.multi_kernel``), ``+nogqa`` (`decode.GQA_DECODE_ATTENTION` off; ``+gqa`` on, the
default), ``+noattnk`` (`gqa_decode.TRITON_KERNEL` off: that attention through SDPA instead of countdown's
Triton kernel; ``+attnk`` on, the default) or ``+det`` (``torch.use_deterministic_algorithms(True)``: the
split-K kernels sum in a fixed order, so the three calls of an instance should generate the same tokens).

Session 8 measured up to 14% between two instances of one configuration in one process. This script
builds ``--instances`` Decoders of each configuration (all alive at once, every one compiled and
captured), then times them round-robin for ``--rounds`` rounds (3 `generate` calls each, prompt 128
+ ``--new-tokens``), so a slow *instance* (slow in every round) is told apart from a slow *moment*
(every instance slow in one round). For every call it records what could explain the difference:

- the greedy tokens (two instances may generate different sequences: the split-K kernels add fp32
  partials with atomics, so a near-tied argmax can flip and the sequences part);
- the measured sparsity of those tokens: the same prompt + tokens run once more eagerly on the
  reference path with every mask counted (`SparsityMeter`), decode positions only. Fewer skipped
  channels means more bytes read, so a sequence that keeps more channels decodes slower;
- the GPU's SM clock, power and temperature around the call (``nvidia-smi``).

With ``--profile`` each instance's captured step is also replayed under torch.profiler and the GPU
time of every kernel summed (`bench/profile_step.py`'s method), so a kernel that differs between
instances is named. Table last; JSON to $OUT/instance_spread.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections import defaultdict

import torch

import countdown
from countdown import attention, decode, ffn, gqa_decode
from countdown.decode import Decoder
from countdown.loading import random_inputs, random_model

# +det: PyTorch's deterministic mode asks cuBLAS for a fixed workspace (it raises without it, in prefill)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
T0 = time.time()
PROMPT = 128
DEFAULT_OPTIONS = dict(decode.COMPILE_OPTIONS)
DEFAULT_GQA = decode.GQA_DECODE_ATTENTION
DEFAULT_ATTNK = gqa_decode.TRITON_KERNEL


def log(*a) -> None:
    print(f"[{time.time() - T0:6.0f}s]", *a, flush=True)


def gib() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def gpu_state() -> dict:
    """SM clock (MHz), power (W) and temperature (C) now, from nvidia-smi; {} where it is missing."""
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
        sm, mem, power, temp = (float(v) for v in line.strip().splitlines()[0].split(","))
        return {"sm_mhz": sm, "mem_mhz": mem, "power_w": power, "temp_c": temp}
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return {}


@torch.no_grad()
def measured_sparsity(model, tokens: torch.Tensor) -> dict[str, float]:
    """Skipped fraction of every sparse site at the decode positions of ``tokens`` ([1, P + new]):
    the eager reference path with a meter on every sparse module (the kernels' masks are the same
    threshold tests)."""
    modules, projections = ffn.sparse_modules(model), attention.sparse_projections(model)
    if not modules and not projections:
        return {}
    for m in modules + projections:
        m.meter, m.sparse_from = ffn.SparsityMeter(), PROMPT
    try:
        model(input_ids=tokens.to(model.device), use_cache=False)
        out = defaultdict(list)
        for m in modules:
            for site, v in m.meter.measured(m.spec.sites).items():
                out[site].append(v)
        for p in projections:
            out[p.site].append(p.meter.measured((p.site,))[p.site])
    finally:
        for m in modules + projections:
            m.meter, m.sparse_from = None, None
    return {site: statistics.fmean(v) for site, v in out.items()}


def profile_kernels(decoder: Decoder, prompt: torch.Tensor, steps: int) -> dict[str, float]:
    """ms per step of every kernel over ``steps`` replays of the captured step (fresh cache first)."""
    from torch.profiler import ProfilerActivity, profile

    decoder.generate(prompt, 2)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder._graphs["greedy"].replay()
        torch.cuda.synchronize()
    per_kernel = defaultdict(float)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name] += evt.time_range.elapsed_us() / steps / 1e3
    return dict(per_kernel)


def save(args, calls: list, profiles: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "instance_spread.json"), "w") as f:
            json.dump({"shape": args.shape, "gpu": device_name(), "torch": torch.__version__,
                       "new_tokens": args.new_tokens, "calls": calls, "profiles": profiles}, f, indent=1)


def parse_config(item: str) -> tuple[str | None, float, float | None, tuple[str, ...]]:
    """``method:s[:attention][+extra...]`` -> (method or None for dense, s, attention, extras)."""
    spec, *extras = item.split("+")
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        raise SystemExit(f"{item}: unknown extras {unknown}; choose from {', '.join(EXTRAS)}")
    method, *rest = spec.split(":")
    if method == "dense":
        return None, 0.0, None, tuple(extras)
    att = float(rest[1]) if len(rest) > 1 else None
    return method, float(rest[0]), att, tuple(extras)


EXTRAS = {"pr": "decode.PERSISTENT_ROW_REDUCTIONS (RMSNorm rows as one-pass persistent reductions)",
          "mk": "Inductor's triton.multi_kernel (a persistent variant of each reduction, picked by timing)",
          "gqa": "decode.GQA_DECODE_ATTENTION on (the default since session 10: one-token attention on the cache as it is)",
          "nogqa": "decode.GQA_DECODE_ATTENTION off (transformers' sdpa: repeat_kv copies of the cache every step)",
          "attnk": "gqa_decode.TRITON_KERNEL on (the packed one-token attention through countdown's Triton kernel)",
          "noattnk": "gqa_decode.TRITON_KERNEL off (the packed one-token attention through SDPA)",
          "det": "torch.use_deterministic_algorithms(True): split-K kernels sum in a fixed order (every call of an "
                 "instance should give the same tokens)"}


def kernel_kind(name: str) -> str:
    """A kernel's family, to sum a step's time by what does the work."""
    for key, kind in (("_prefetch_kernel", "input-sparse (ours)"), ("_input_sparse", "input-sparse (ours)"),
                      ("_sparse_ffn", "sparse FFN (ours)"), ("triton_per", "Inductor persistent reductions"),
                      ("triton_red", "Inductor looped reductions"), ("triton_poi", "Inductor pointwise"),
                      ("triton_tem", "Inductor templates"), ("flash", "attention"), ("fmha", "attention"),
                      ("attention", "attention"), ("gemv", "cuBLAS"), ("gemm", "cuBLAS"), ("sm90", "cuBLAS")):
        if key in name:
            return kind
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (use --shape smollm2-135m)")
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--configs", default="teal:0.5:0.5", help="comma-separated dense | method:s[:attention]")
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--profile", action="store_true", help="also profile each instance's step by kernel")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds: stop starting rounds past it")
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    model = random_model(args.shape, args.device, "bfloat16" if args.device == "cuda" else "float32")
    prompt, calib = random_inputs(model, PROMPT, 4)
    calls, profiles = [], {}
    for name in args.configs.split(","):
        method, s, att, extras = parse_config(name)
        if time.time() - T0 > args.deadline - 90:  # a configuration takes ~90 s on an H100 (compile first)
            log("deadline: skipping", name)
            continue
        decode.PERSISTENT_ROW_REDUCTIONS = "pr" in extras
        decode.GQA_DECODE_ATTENTION = "gqa" in extras or (DEFAULT_GQA and "nogqa" not in extras)
        gqa_decode.TRITON_KERNEL = "off" if "noattnk" in extras else ("auto" if "attnk" in extras else DEFAULT_ATTNK)
        decode.COMPILE_OPTIONS = {**DEFAULT_OPTIONS, **({"triton.multi_kernel": 1} if "mk" in extras else {})}
        torch.use_deterministic_algorithms("det" in extras)  # read at launch: the captured graphs keep it
        if method:
            countdown.sparsify(model, method, s, calibration=calib, attention=att, progress=False)
        if att is None:
            countdown.fuse_qkv(model)  # dense q/k/v in one launch: the best dense we have, under FFN sparsity too
        decoders = []
        for i in range(args.instances):
            t = time.time()
            decoders.append(Decoder(model, max_len=PROMPT + max(args.new_tokens, 16), compile=True))
            decoders[-1].generate(prompt, 16)  # compile (a cache hit after the first), capture
            log(f"{name} instance {i} ready ({time.time() - t:.0f}s), {gib():.2f} GiB")
        for r in range(args.rounds):
            if time.time() - T0 > args.deadline:
                log("deadline: no more rounds")
                break
            for i, decoder in enumerate(decoders):
                for c in range(3):
                    before = gpu_state()
                    res = decoder.generate(prompt, args.new_tokens)
                    calls.append({"config": name, "instance": i, "round": r, "call": c,
                                  "tokens_per_s": res.tokens_per_second, "gib_allocated": gib(), "gib_peak": peak_gib(),
                                  "tokens": res.tokens[0, PROMPT:].tolist(),
                                  "gpu_before": before, "gpu_after": gpu_state()})
                log(name, f"round {r} instance {i}:", " ".join(f"{q['tokens_per_s']:.1f}" for q in calls[-3:]))
        if args.profile:
            for i, decoder in enumerate(decoders):
                profiles[f"{name} #{i}"] = profile_kernels(decoder, prompt, 20)
        # the sparsity each distinct sequence had (distinct: calls that generated the same tokens share it)
        seen: dict[tuple, dict] = {}
        for q in calls:
            if q["config"] == name:
                key = tuple(q["tokens"])
                if key not in seen:
                    seen[key] = measured_sparsity(model, torch.cat([prompt[0], torch.tensor(key)]).unsqueeze(0))
                q["skipped"] = seen[key]
                q["sequence"] = list(seen).index(key)
        save(args, calls, profiles)  # after every configuration: a run cut short keeps what it measured
        del decoders
        torch._dynamo.reset()
        if method:
            countdown.unsparsify(model)
        if att is None:
            countdown.unfuse_qkv(model)
    decode.PERSISTENT_ROW_REDUCTIONS, decode.COMPILE_OPTIONS = False, DEFAULT_OPTIONS
    decode.GQA_DECODE_ATTENTION = DEFAULT_GQA
    gqa_decode.TRITON_KERNEL = DEFAULT_ATTNK
    torch.use_deterministic_algorithms(False)
    save(args, calls, profiles)
    print(f"\n{args.shape}, {model.dtype}, Decoder(compile=True).generate, prompt {PROMPT} + {args.new_tokens}, "
          f"{device_name()}, {time.time() - T0:.0f}s")
    print("| config | instance | round | tok/s (3 calls) | sequence | skipped per site | GiB allocated | SM MHz | W |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in range(0, len(calls), 3):
        g = calls[k : k + 3]
        sk = ", ".join(f"{s} {v:.3f}" for s, v in g[0].get("skipped", {}).items())
        print(f"| {g[0]['config']} | {g[0]['instance']} | {g[0]['round']} | "
              f"{' / '.join(format(q['tokens_per_s'], '.1f') for q in g)} | {','.join(str(q.get('sequence')) for q in g)} | "
              f"{sk} | {g[0].get('gib_allocated') or float('nan'):.2f} | {g[0]['gpu_after'].get('sm_mhz', float('nan')):.0f} | {g[0]['gpu_after'].get('power_w', float('nan')):.0f} |")
    if profiles:
        names = sorted({k for p in profiles.values() for k in p}, key=lambda k: -max(p.get(k, 0) for p in profiles.values()))
        print("\nms per step by kernel (20 replays), instances side by side; kernels whose spread > 0.01 ms")
        print("| kernel | " + " | ".join(profiles) + " |")
        print("|---|" + "---|" * len(profiles))
        print("| total | " + " | ".join(f"{sum(p.values()):.3f}" for p in profiles.values()) + " |")
        for kind in sorted({kernel_kind(k) for p in profiles.values() for k in p}):
            v = [sum(ms for k, ms in p.items() if kernel_kind(k) == kind) for p in profiles.values()]
            print(f"| {kind} (sum) | " + " | ".join(f"{x:.3f}" for x in v) + " |")
        for k in names[:30]:
            v = [p.get(k, 0.0) for p in profiles.values()]
            if max(v) - min(v) > 0.01:
                print(f"| {k[:70]} | " + " | ".join(f"{x:.3f}" for x in v) + " |")


if __name__ == "__main__":
    main()
