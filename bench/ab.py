"""End-to-end decode A/B: model configurations × option sets, in one process (tokens/s, tokens, sparsity).

    PYTHONPATH=. python bench/ab.py --configs dense,teal:0.5:0.5 --options attention_kernel=off
    PYTHONPATH=. python bench/ab.py --configs dense,teal:0.5:0.5,m-countdown:0.7:0.5 \
        --options noattnk:attention_kernel=off --options nogqa:gqa_attention=False --profile
    PYTHONPATH=. python bench/ab.py --configs teal:0.5:0.5 --options det:deterministic=True
    PYTHONPATH=. python bench/ab.py --list-options          # the fields an option set may change

A configuration is ``dense`` or ``method:sparsity[:attention-input sparsity]`` (q/k/v fused whenever the
attention inputs stay dense, as in the best dense baseline). An option set is ``[name:]key=value[,key=value]``,
where each key is a field of `countdown.DecodeOptions` (decode loop: attention path, compile options, ...)
or of `countdown.KernelPolicy` (which kernel variant serves each op), and the value a Python literal
(``False``, ``4``, ``{'triton.multi_kernel': 1}``) or a bare word (``off``). ``deterministic=True`` is
PyTorch's own switch, ``torch.use_deterministic_algorithms`` (the split-K kernels then sum in a fixed order,
so the three calls of an instance should give one token sequence). The set ``default`` (no change) always
runs first. Every configuration is crossed with every set; the options objects are passed as arguments
(``Decoder(options=...)``, ``countdown.set_kernels(model, policy)``), never written into a module.

Per (configuration, set): ``--instances`` Decoders built (each compiled and captured), timed round-robin
for ``--rounds`` rounds of 3 ``generate`` calls (prompt 128 + ``--new-tokens``), so a slow instance is
told from a slow moment. Each call records tokens/s, its greedy tokens, the measured sparsity of those
tokens (an eager reference pass with every mask counted) and the GPU's clocks and power. ``--profile``
also sums each kernel's GPU time over 20 replays of the captured step. Ratios are against the ``dense``
default of the same run. Table last; JSON (every call with its full options) to $OUT/ab.json.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import statistics
import time
from collections import defaultdict

import torch
from _common import T0, device_name, environment, gib, gpu_state, log, peak_gib, save_json

import countdown
from countdown import attention, ffn
from countdown.decode import Decoder
from countdown.loading import RANDOM_SHAPES, random_inputs, random_model
from countdown.predictor import random_predictors

PROMPT = 128
TORCH_KEYS = {"deterministic": "torch.use_deterministic_algorithms (PyTorch's own switch)"}


def options_classes():
    """(DecodeOptions, KernelPolicy) from countdown, or a clear exit where this tree predates them."""
    missing = [n for n in ("DecodeOptions", "KernelPolicy") if not hasattr(countdown, n)]
    if missing:
        raise SystemExit(f"this countdown has no {' / '.join(missing)} (issue 25 item 1); bench/ab.py needs them")
    return countdown.DecodeOptions, countdown.KernelPolicy


def split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets and quotes (a dict value may hold commas)."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0 and not quote:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in [*parts, cur] if p.strip()]


def literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value  # a bare word: "off", "auto"


@dataclasses.dataclass(frozen=True)
class OptionSet:
    name: str
    decode: dict
    kernels: dict
    torch_switches: dict


def parse_option_set(text: str, decode_fields: set[str], kernel_fields: set[str]) -> OptionSet:
    """``[name:]key=value[,key=value]`` -> OptionSet; unknown keys are refused with the known ones listed."""
    head, _, rest = text.partition(":")
    name, body = (head, rest) if rest and "=" not in head else (text, text)
    sets: dict[str, dict] = {"decode": {}, "kernels": {}, "torch": {}}
    for item in split_top(body):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise SystemExit(f"option set {text!r}: {item!r} is not key=value")
        where = "decode" if key in decode_fields else "kernels" if key in kernel_fields else \
            "torch" if key in TORCH_KEYS else None
        if where is None:
            raise SystemExit(f"option set {text!r}: unknown key {key!r}; DecodeOptions: {', '.join(sorted(decode_fields))}; "
                             f"KernelPolicy: {', '.join(sorted(kernel_fields))}; torch: {', '.join(TORCH_KEYS)}")
        sets[where][key] = literal(value.strip())
    return OptionSet(name, sets["decode"], sets["kernels"], sets["torch"])


def parse_config(item: str) -> tuple[str | None, float, float | None]:
    """``dense`` | ``method:s[:attention]`` -> (method or None, s, attention sparsity or None)."""
    method, *rest = item.split(":")
    if method == "dense":
        return None, 0.0, None
    if not rest:
        raise SystemExit(f"configuration {item!r}: write method:sparsity[:attention], e.g. teal:0.5:0.5")
    try:
        return method, float(rest[0]), float(rest[1]) if len(rest) > 1 else None
    except ValueError:
        raise SystemExit(f"configuration {item!r}: sparsities must be numbers") from None


@torch.no_grad()
def measured_sparsity(model, tokens: torch.Tensor) -> dict[str, float]:
    """Skipped fraction of every sparse site at the decode positions of ``tokens`` ([1, P + new]): the
    eager reference path with a meter on every sparse module (the kernels apply the same thresholds)."""
    modules, projections = ffn.sparse_modules(model), attention.sparse_projections(model)
    for m in modules + projections:
        m.meter, m.sparse_from = ffn.SparsityMeter(), PROMPT
    try:
        if modules or projections:
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


def profile_kernels(decoder: Decoder, prompt: torch.Tensor, steps: int = 20) -> dict[str, float]:
    """ms per step of every CUDA kernel over ``steps`` replays of the captured greedy step (fresh cache)."""
    from torch.profiler import ProfilerActivity, profile

    decoder.generate(prompt, 2)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder._graphs["greedy"].replay()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name] += evt.time_range.elapsed_us() / steps / 1e3
    return dict(per_kernel)


KERNEL_KINDS = (("_prefetch_kernel", "input-sparse (ours)"), ("_input_sparse", "input-sparse (ours)"),
                ("_sparse_ffn", "sparse FFN (ours)"), ("_coef_kernel", "sparse FFN (ours)"),
                ("_down", "sparse FFN (ours)"), ("_decode_attention", "attention"),
                ("triton_per", "Inductor persistent reductions"), ("triton_red", "Inductor looped reductions"),
                ("triton_poi", "Inductor pointwise"), ("triton_tem", "Inductor templates"), ("flash", "attention"),
                ("fmha", "attention"), ("attention", "attention"), ("gemv", "cuBLAS"), ("gemm", "cuBLAS"),
                ("sm90", "cuBLAS"))


def kernel_kind(name: str) -> str:
    return next((kind for key, kind in KERNEL_KINDS if key in name), "other")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (with --shape smollm2-135m)")
    ap.add_argument("--shape", default="llama-3-8b", choices=sorted(RANDOM_SHAPES))
    ap.add_argument("--configs", default="dense,teal:0.5:0.5", help="comma-separated dense | method:s[:attention]")
    ap.add_argument("--options", action="append", default=[], metavar="[NAME:]KEY=VALUE[,KEY=VALUE]",
                    help="an option set to cross with every configuration (repeatable); 'default' always runs")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="DecodeOptions(compile=...) of every set, unless a set changes it")
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--profile", action="store_true", help="also sum each instance's step by kernel")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds: start nothing past it")
    ap.add_argument("--list-options", action="store_true", help="print the option fields and exit")
    args = ap.parse_args()

    decode_cls, policy_cls = options_classes()
    decode_fields = {f.name for f in dataclasses.fields(decode_cls)}
    kernel_fields = {f.name for f in dataclasses.fields(policy_cls)}
    if args.list_options:
        print("DecodeOptions:", decode_cls())
        print("KernelPolicy:", policy_cls())
        print("torch:", TORCH_KEYS)
        return
    option_sets = [OptionSet("default", {}, {}, {})]
    option_sets += [parse_option_set(text, decode_fields, kernel_fields) for text in args.options]
    configs = [(item, *parse_config(item)) for item in args.configs.split(",")]
    base_decode = decode_cls(compile=args.compile)

    model = random_model(args.shape, args.device, "bfloat16" if args.device == "cuda" else "float32")
    prompt, calib = random_inputs(model, PROMPT, 4)
    calls: list[dict] = []
    profiles: dict[str, dict] = {}
    info = {**environment(), "shape": args.shape, "prompt": PROMPT, "new_tokens": args.new_tokens,
            "configs": args.configs, "option_sets": [dataclasses.asdict(o) for o in option_sets]}
    with torch._dynamo.config.patch(recompile_limit=64, cache_size_limit=64):
        for label, method, s, att in configs:
            if time.time() - T0 > args.deadline - 90 * len(option_sets):  # ~90 s per (config, set) on an H100
                log("deadline: skipping", label)
                continue
            if method:
                preds = random_predictors(model) if method == "d-countdown" else None
                countdown.sparsify(model, method, s, calibration=calib, predictors=preds, attention=att, progress=False)
            if att is None:
                countdown.fuse_qkv(model)  # dense q/k/v in one launch: the best dense baseline
            built = []
            for opts in option_sets:
                decode_options = dataclasses.replace(base_decode, **opts.decode)
                policy = policy_cls(**opts.kernels)
                torch.use_deterministic_algorithms(bool(opts.torch_switches.get("deterministic", False)))
                countdown.set_kernels(model, policy)
                for i in range(args.instances):
                    t = time.time()
                    decoder = Decoder(model, max_len=PROMPT + max(args.new_tokens, 16), options=decode_options)
                    decoder.generate(prompt, 16)  # compile (a cache hit after the first) and capture
                    built.append((opts, decode_options, policy, i, decoder))
                    log(f"{label} [{opts.name}] instance {i} ready ({time.time() - t:.0f}s), {gib():.2f} GiB")
            for r in range(args.rounds):
                if time.time() - T0 > args.deadline:
                    log("deadline: no more rounds")
                    break
                for opts, decode_options, policy, i, decoder in built:
                    torch.use_deterministic_algorithms(bool(opts.torch_switches.get("deterministic", False)))
                    for c in range(3):
                        before = gpu_state()
                        res = decoder.generate(prompt, args.new_tokens)
                        calls.append({"config": label, "options_name": opts.name, "instance": i, "round": r, "call": c,
                                      "decode_options": dataclasses.asdict(decode_options),
                                      "kernel_policy": dataclasses.asdict(policy), "torch": opts.torch_switches,
                                      "tokens_per_s": res.tokens_per_second, "gib_allocated": gib(),
                                      "gib_peak": peak_gib(), "tokens": res.tokens[0, PROMPT:].tolist(),
                                      "gpu_before": before, "gpu_after": gpu_state()})
                    log(f"{label} [{opts.name}] round {r} instance {i}:",
                        " ".join(f"{q['tokens_per_s']:.1f}" for q in calls[-3:]))
            if args.profile and torch.cuda.is_available():
                for opts, _, _, i, decoder in built:
                    profiles[f"{label} [{opts.name}] #{i}"] = profile_kernels(decoder, prompt)
            torch.use_deterministic_algorithms(False)
            seen: dict[tuple, dict] = {}  # measured sparsity per distinct generated sequence
            for q in calls:
                if q["config"] == label:
                    key = tuple(q["tokens"])
                    if key not in seen:
                        seen[key] = measured_sparsity(model, torch.cat([prompt[0], torch.tensor(key)]).unsqueeze(0))
                    q["skipped"], q["sequence"] = seen[key], list(seen).index(key)
            save_json("ab.json", {**info, "calls": calls, "profiles": profiles})  # a cut run keeps what it has
            del built
            torch._dynamo.reset()
            if method:
                countdown.unsparsify(model)
            if att is None:
                countdown.unfuse_qkv(model)
    save_json("ab.json", {**info, "calls": calls, "profiles": profiles})
    print_tables(args, calls, profiles, option_sets)


def print_tables(args, calls: list[dict], profiles: dict, option_sets: list[OptionSet]) -> None:
    print(f"\n{args.shape}, Decoder.generate, prompt {PROMPT} + {args.new_tokens}, {device_name()}, "
          f"{time.time() - T0:.0f}s")
    for o in option_sets:
        print(f"- {o.name}: DecodeOptions {o.decode or '(defaults)'}, KernelPolicy {o.kernels or '(defaults)'}"
              + (f", torch {o.torch_switches}" if o.torch_switches else ""))
    dense = [q["tokens_per_s"] for q in calls if q["config"] == "dense" and q["options_name"] == "default"]
    base = statistics.median(dense) if dense else float("nan")
    print("| config | options | tok/s (median of calls) | range | vs dense default | sequences | skipped per site | GiB | SM MHz |")
    print("|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for q in calls:
        groups[q["config"], q["options_name"]].append(q)
    for (config, name), g in groups.items():
        tps = [q["tokens_per_s"] for q in g]
        skipped = ", ".join(f"{s} {v:.3f}" for s, v in g[0].get("skipped", {}).items()) or "—"
        print(f"| {config} | {name} | {statistics.median(tps):.1f} | {min(tps):.1f}-{max(tps):.1f} | "
              f"{statistics.median(tps) / base:.3f}× | {len({q.get('sequence') for q in g})} | {skipped} | "
              f"{g[0]['gib_allocated']:.2f} | {g[0]['gpu_after'].get('sm_mhz', float('nan')):.0f} |")
    if profiles:
        print("\nms per step by kernel family (20 replays)")
        print("| family | " + " | ".join(profiles) + " |")
        print("|---|" + "---|" * len(profiles))
        print("| total | " + " | ".join(f"{sum(p.values()):.3f}" for p in profiles.values()) + " |")
        for kind in sorted({kernel_kind(k) for p in profiles.values() for k in p}):
            values = [sum(ms for k, ms in p.items() if kernel_kind(k) == kind) for p in profiles.values()]
            print(f"| {kind} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()
