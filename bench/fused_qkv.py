"""q, k and v in one launch under torch.compile (issues 11 and 13): decode tokens/s with and without it.

    PYTHONPATH=. python bench/fused_qkv.py               # batch 1, five configurations: about 4-5 minutes
    PYTHONPATH=. python bench/fused_qkv.py --batch 4     # the same at batch 4 (a second run)

One random-weight bf16 model of the Llama-3-8B shape (`countdown.loading.random_model`), one process.
Every point is `countdown.Decoder(model, compile=True)` (torch.compile, then the CUDA graph), prompt
128 → ``--new-tokens`` new tokens, median of 3 calls after a warm-up call (which compiles: about 45 s
a point on an H100, hence one batch size per run by default). ``--configs`` (default: all but
``teal50-wide``):

    dense              cuBLAS q, k, v (three GEMVs)
    dense+fuse         `countdown.fuse_qkv(model)`: one input-sparse launch at threshold 0
    mcd70              M-COUNTDOWN 70%, FFN only (attention dense)
    mcd70+fuse         the same with q/k/v fused (the dense baseline's treatment)
    teal50-wide        TEAL 50% model-wide (attention inputs 50%), kernels.input_sparse.FUSE_QKV off:
                       q/k/v as three launches (what torch.compile got before this change)
    teal50-wide+fuse   FUSE_QKV on (TEAL's gate and up: one launch, ``input_sparse.FUSE_GATE_UP``)
    teal50-wide+fuse+gu2   the same with gate and up as two launches (before FUSE_GATE_UP)
    mcd70-attn50+fuse  M-COUNTDOWN 70% + attention inputs 50%, q/k/v fused (issue 13's combined target)
    dense+fuse+nocdt   dense+fuse compiled without Inductor's coordinate-descent tuning (Decoder's default
                       since 2026-11-23: every other point has it)
    <any>+pdl          the same with programmatic dependent launch: Inductor's kernels (``triton.enable_pdl``)
                       and ours (``countdown.kernels.set_pdl``), so a kernel starts while the one before drains
    <any>+pr           the same with `decode.PERSISTENT_ROW_REDUCTIONS`: the step's RMSNorm rows compiled as
                       persistent (one-pass) reductions instead of Inductor's looped two-pass ones
    <any>+mk           the same with Inductor's ``triton.multi_kernel``: the add + RMSNorm reductions of one
                       4096-wide row also get a one-pass (persistent) variant, and the faster one is kept
    <any>+nogqa        the same without `decode.GQA_DECODE_ATTENTION` (on in every other point, as it is by
                       default since session 10): transformers' sdpa with its repeat_kv copy of the cache

"vs best dense" divides by the fastest dense configuration of the run at that batch.

Before timing a sparsification's fused configuration it checks, eagerly, that the fused path runs (one
3-weight launch per layer for a decode step of 1 and of 4 tokens) and matches the unfused one: layer
0's q/k/v against cuBLAS (dense) or three single launches (sparse) on a random input ("MISMATCH" in
the table above ``--tol`` relative L2 error), and the logits of one decode step (reported). GPU memory
before and after fusing (no extra weight copy). Points that would end past ``--deadline`` are skipped
and named. Table last; JSON to $OUT/fused_qkv.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import countdown
from countdown import attention
from countdown import decode
from countdown.decode import Decoder
from countdown.kernels import input_sparse, input_sparse_prefetch
from countdown.kernels import _core
from countdown.kernels._core import set_pdl
from countdown.loading import RANDOM_SHAPES, random_inputs, random_model

T0 = time.time()
PROMPT = 128


def log(*a) -> None:
    print(f"[{time.time() - T0:6.0f}s]", *a, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def gib(settle: bool = True) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    if settle:
        gc.collect()
        torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / 2**30


class Launches:
    """Counts prefetch-kernel launches by their number of weights (3: a fused q/k/v) while active."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self._real = input_sparse_prefetch.launch

    def __enter__(self) -> "Launches":
        input_sparse_prefetch.launch = lambda *a, **kw: self.seen.append(len(a[1])) or self._real(*a, **kw)
        return self

    def __exit__(self, *exc) -> None:
        input_sparse_prefetch.launch = self._real


@torch.no_grad()
def check(model, fuse_on, tol: float) -> dict:
    """Fused against unfused, eagerly: launches per decode step, layer 0's q/k/v, one step's logits.
    ``fuse_on(bool)`` switches the fusion of the model as it is set up."""
    n_layers = len(model.model.layers)
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(11)
    out = {"ok": True}
    for b in (1, 4):
        ids = torch.randint(model.config.vocab_size, (b, 1), generator=g).to(model.device)
        x = torch.randn(b, 1, attn.q_proj.in_features, generator=g).to(model.device, model.dtype)
        fuse_on(False)
        ref_logits = model(input_ids=ids, use_cache=False).logits
        fuse_on(True)
        reason = attn.qkv_skip_reason(x)
        if reason is not None:
            raise RuntimeError(f"batch {b}: the fused path does not run: {reason}")
        with Launches() as seen:
            logits = model(input_ids=ids, use_cache=False).logits
        if seen.seen.count(3) != n_layers:
            raise RuntimeError(f"batch {b}: {seen.seen.count(3)} fused q/k/v launches in one step, expected {n_layers}")
        projections = attn.qkv_projections()
        dense = all(isinstance(p, attention.FusedQKVLinear) for p in projections)
        # unfused: cuBLAS for dense projections, one input-sparse launch each for sparse ones
        ref_qkv = [F.linear(x, p.weight, p.bias) if dense else p(x) for p in projections]
        thresholds = [attention.DENSE_THRESHOLD if dense else p.sparse_threshold for p in projections]
        ys = input_sparse_prefetch.input_sparse_multi(x, [p.weight.t() for p in projections], thresholds)
        ys = [y if p.bias is None else y + p.bias for y, p in zip(ys, projections)]
        out[f"qkv_rel_err_b{b}"] = max(rel(y, r) for y, r in zip(ys, ref_qkv))
        out[f"logits_rel_err_b{b}"] = rel(logits, ref_logits)
        out["ok"] &= out[f"qkv_rel_err_b{b}"] <= tol
    log("check", json.dumps(out))
    return out


def pdl_check(model, prompt_1: torch.Tensor, new_tokens: int = 48) -> float:
    """Fraction of greedy tokens that agree between our kernels launched without and with programmatic
    dependent launch, through the CUDA graph without torch.compile (the same kernels and configs both
    times, so anything but 1.0 is a race)."""
    runs, default = [], _core.PDL
    for on in (False, True):
        set_pdl(on)
        runs.append(Decoder(model, max_len=PROMPT + new_tokens, compile=False).generate(prompt_1, new_tokens).tokens)
    set_pdl(default)
    return float((runs[0] == runs[1]).float().mean())


def speed(model, prompt_1: torch.Tensor, b: int, new_tokens: int, compile: bool, extras=()) -> dict:
    prompt = prompt_1.expand(b, -1).contiguous()
    t = time.time()
    input_sparse.FUSE_GATE_UP = "gu2" not in extras  # read when the step is traced / captured
    saved_options = decode.COMPILE_OPTIONS
    decode.COMPILE_OPTIONS = {} if "nocdt" in extras else {"coordinate_descent_tuning": True}
    if "pdl" in extras:
        decode.COMPILE_OPTIONS = {**decode.COMPILE_OPTIONS, "triton.enable_pdl": True}
    if "mk" in extras:  # persistent (one-pass) variants of reductions up to 16x longer, picked by timing
        decode.COMPILE_OPTIONS = {**decode.COMPILE_OPTIONS, "triton.multi_kernel": 1}
    default_pr = decode.PERSISTENT_ROW_REDUCTIONS
    decode.PERSISTENT_ROW_REDUCTIONS = "pr" in extras
    default_gqa = decode.GQA_DECODE_ATTENTION
    decode.GQA_DECODE_ATTENTION = "nogqa" not in extras
    default_pdl = _core.PDL
    set_pdl("pdl" in extras)  # every point says whether it has PDL: "+pdl" on, the rest off
    decoder = Decoder(model, max_len=PROMPT + max(new_tokens, 16), batch_size=b, compile=compile)
    decoder.generate(prompt, 16)  # compile, capture, autotune
    results = [decoder.generate(prompt, new_tokens) for _ in range(3)]
    row = {"tokens_per_s": statistics.median(r.tokens_per_second for r in results),
           "calls_tokens_per_s": [r.tokens_per_second for r in results],
           "tokens": results[0].tokens[0, PROMPT:].tolist(), "seconds": time.time() - t}
    del decoder
    if compile:
        torch._dynamo.reset()  # one compiled graph per point; keeps dynamo under its recompile limit
    input_sparse.FUSE_GATE_UP = True
    decode.COMPILE_OPTIONS = saved_options
    decode.PERSISTENT_ROW_REDUCTIONS = default_pr
    decode.GQA_DECODE_ATTENTION = default_gqa
    set_pdl(default_pdl)
    return row


# name: (method, FFN sparsity, attention-input sparsity, fused, extras); extras: "nocdt" compiles without
# Inductor's coordinate-descent tuning, "gu2" runs TEAL's gate and up as two launches (FUSE_GATE_UP off)
CONFIGS = {
    "dense": ("dense", 0.0, None, False, ()),
    "dense+fuse": ("dense", 0.0, None, True, ()),
    "dense+fuse+nocdt": ("dense", 0.0, None, True, ("nocdt",)),
    "mcd70": ("m-countdown", 0.7, None, False, ()),
    "mcd70+fuse": ("m-countdown", 0.7, None, True, ()),
    "mcd70-attn50+fuse": ("m-countdown", 0.7, 0.5, True, ()),
    "teal50-wide": ("teal", 0.5, 0.5, False, ()),  # attention inputs sparse, q/k/v as three launches
    "teal50-wide+fuse": ("teal", 0.5, 0.5, True, ()),
    "teal50-wide+fuse+gu2": ("teal", 0.5, 0.5, True, ("gu2",)),
}
# the quality/speed trade-off grid of bench/attention_quality.py (M-COUNTDOWN 50/70% with attention inputs
# 0/25/40/50%, TEAL model-wide 25/40/50%): every point fused, as the dense baseline is
for _s in (0.5, 0.7):
    for _a in (None, 0.25, 0.4, 0.5):
        CONFIGS[f"mcd{round(_s * 100)}{'' if _a is None else f'-attn{round(_a * 100)}'}+fuse"] = \
            ("m-countdown", _s, _a, True, ())
for _s in (0.25, 0.4):
    CONFIGS[f"teal{round(_s * 100)}-wide+fuse"] = ("teal", _s, _s, True, ())
CONFIGS.update({f"{name}+pdl": (*c[:4], (*c[4], "pdl")) for name, c in list(CONFIGS.items())})
CONFIGS.update({f"{name}+pr": (*c[:4], (*c[4], "pr")) for name, c in list(CONFIGS.items())})
CONFIGS.update({f"{name}+mk": (*c[:4], (*c[4], "mk")) for name, c in list(CONFIGS.items())})
# the points the targets are about without the GQA decode attention (on by default since session 10)
for _name in ("dense+fuse+pdl", "teal50-wide+fuse+pdl", "mcd70-attn50+fuse+pdl"):
    CONFIGS[f"{_name}+nogqa"] = (*CONFIGS[_name][:4], (*CONFIGS[_name][4], "nogqa"))
DEFAULT = "dense,dense+fuse,mcd70,mcd70+fuse,teal50-wide+fuse"


def dump_inductor_code(path: str) -> None:
    """The Python files Inductor generated in this process (its kernels, by name) into a tar.gz."""
    import glob
    import tarfile

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    files = [f for f in glob.glob(os.path.join(cache_dir(), "**", "*.py"), recursive=True)
             if "triton" in open(f, errors="ignore").read()]
    with tarfile.open(path, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=os.path.relpath(f, cache_dir()))
    log(f"{len(files)} generated files -> {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", default="1", help="batch sizes, e.g. 1,4 (each point compiles: ~45 s on an H100)")
    ap.add_argument("--configs", default=DEFAULT, help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--no-compile", action="store_true", help="CUDA graph only")
    ap.add_argument("--tol", type=float, default=2e-2, help="largest relative error of layer 0's q/k/v")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (Triton's interpreter; use --layers 2)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape has")
    ap.add_argument("--no-pdl-check", action="store_true", help="skip the PDL on/off token comparison "
                    "(bench/pdl_check.py checks the kernels themselves)")
    ap.add_argument("--dump-code", action="store_true", help="also write Inductor's generated code to $OUT")
    ap.add_argument("--deadline", type=float, default=390.0,
                    help="seconds: skip points that would end past it (the table still prints)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    compile = not args.no_compile
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    if args.layers is None:
        model = random_model(args.shape, args.device, args.dtype)
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        config = LlamaConfig(**{**RANDOM_SHAPES[args.shape], "num_hidden_layers": args.layers})
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    kernels = "auto" if args.device == "cuda" else "always"  # elsewhere: Triton's interpreter
    prompt, calib = random_inputs(model, PROMPT, 4)
    log(f"model built, {gib():.2f} GiB")
    points, skipped, memory = [], [], {}
    longest = 0.0
    groups = []  # configs sharing one sparsification, in the order given
    for n in names:
        key = CONFIGS[n][:3]
        if not groups or groups[-1][0] != key:
            groups.append((key, []))
        groups[-1][1].append(n)
    for (method, s, att), group in groups:
        if method != "dense":
            countdown.sparsify(model, method, s, calibration=calib, attention=att, kernels=kernels, progress=False)
        if att is None:  # dense q/k/v: the opt-in fusion
            def fuse_on(on: bool) -> None:
                countdown.fuse_qkv(model, kernels) if on else countdown.unfuse_qkv(model)
        else:  # input-sparse q/k/v: the module switch
            def fuse_on(on: bool) -> None:
                input_sparse.FUSE_QKV = on
        match = None
        if any(CONFIGS[n][3] for n in group):
            before = gib()
            fuse_on(True)
            memory[group[0].split("+")[0]] = {"unfused_gib": before, "fused_gib": gib()}
            match = check(model, fuse_on, args.tol)
        for n in group:
            fuse_on(CONFIGS[n][3])
            for b in batches:
                if time.time() - T0 + longest > args.deadline:
                    skipped.append(f"{n} batch {b}")
                    log("deadline: skipping", n, "batch", b)
                    continue
                pdl_same = (pdl_check(model, prompt) if "pdl" in CONFIGS[n][4] and b == batches[0]
                            and not args.no_pdl_check else None)
                if pdl_same is not None:
                    log(n, f"PDL on/off greedy tokens agree: {pdl_same:.0%}")
                r = speed(model, prompt, b, args.new_tokens, compile, CONFIGS[n][4])
                r["pdl_same_tokens"] = pdl_same
                longest = max(longest, r["seconds"])
                points.append({"config": n, "fused": CONFIGS[n][3], "batch": b, **r,
                               "match": match if CONFIGS[n][3] else None})
                log(n, f"batch {b}: {r['tokens_per_s']:.1f} tok/s ({r['seconds']:.0f}s)")
        fuse_on(False)
        if method != "dense":
            countdown.unsparsify(model)
    input_sparse.FUSE_QKV = True

    def find(config: str, b: int) -> dict | None:
        return next((q for q in points if q["config"] == config and q["batch"] == b), None)

    for p in points:
        dense, unfused = find("dense", p["batch"]), find(p["config"].split("+")[0], p["batch"])
        p["vs_dense"] = p["tokens_per_s"] / dense["tokens_per_s"] if dense else None
        dense_all = [q["tokens_per_s"] for q in points if q["batch"] == p["batch"] and CONFIGS[q["config"]][0] == "dense"]
        p["vs_best_dense"] = p["tokens_per_s"] / max(dense_all) if dense_all else None
        p["vs_unfused"] = p["tokens_per_s"] / unfused["tokens_per_s"] if unfused else None
        if p["fused"] and unfused:
            p["same_tokens"] = sum(a == b for a, b in zip(p["tokens"], unfused["tokens"])) / len(unfused["tokens"])
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    route = ("torch.compile + " if compile else "") + ("CUDA graph" if args.device == "cuda" else "eager")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "fused_qkv.json"), "w") as f:
            json.dump({"shape": args.shape, "gpu": device, "route": route, "new_tokens": args.new_tokens,
                       "torch": torch.__version__, "memory": memory, "skipped": skipped,
                       "points": [{k: v for k, v in p.items() if k != "tokens"} for p in points]}, f, indent=1)
    if out and args.dump_code:
        dump_inductor_code(os.path.join(out, "inductor_code.tar.gz"))
    layers = f" ({args.layers} layers)" if args.layers else ""
    print(f"\n{args.shape}{layers}, {args.dtype}, {route}, prompt {PROMPT} + {args.new_tokens} new tokens, median of 3, {device}, "
          f"torch {torch.__version__}, {time.time() - T0:.0f}s")
    for name, m in memory.items():
        print(f"GPU memory, {name}: {m['unfused_gib']:.3f} GiB unfused, {m['fused_gib']:.3f} GiB fused")
    if skipped:
        print("skipped (deadline):", ", ".join(skipped))
    print("\n| config | batch | tok/s | vs dense | vs best dense | vs unfused | greedy tokens as unfused | "
          "q/k/v rel err | logits rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in points:
        m, b = p["match"], 1 if p["batch"] == 1 else 4
        err = "—" if m is None else f"{m[f'qkv_rel_err_b{b}']:.1e}" + ("" if m["ok"] else " MISMATCH")
        lerr = "—" if m is None else f"{m[f'logits_rel_err_b{b}']:.1e}"
        ratio = lambda v: "—" if v is None else f"{v:.3f}×"  # noqa: E731
        same = f"{p['same_tokens']:.0%}" if "same_tokens" in p else "—"
        print(f"| {p['config']} | {p['batch']} | {p['tokens_per_s']:.1f} | {ratio(p['vs_dense'])} | "
              f"{ratio(p['vs_best_dense'])} | {ratio(p['vs_unfused'])} | {same} | {err} | {lerr} |")


if __name__ == "__main__":
    main()
