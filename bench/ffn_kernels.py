"""Sparse-FFN kernel benchmark at batch-1 decode: build, check on the device, sweep, time, table.

    PYTHONPATH=. python bench/ffn_kernels.py                 # full run (sweep + table), about 1 min on an H100
    PYTHONPATH=. python bench/ffn_kernels.py --no-sweep      # the shipped configurations only
    PYTHONPATH=. python bench/ffn_kernels.py --quick         # one shape, two sparsities (smoke run)

For the Llama-3-8B (H=4096, I=14336) and Llama-2-7B (H=4096, I=11008) FFNs in bf16 it times, per
sparsity s in {0, 0.5, 0.7, 0.9}:
  dense        torch: F.linear gate, F.linear up, silu, mul, F.linear down (cuBLAS)
  cats         cuBLAS gate, then gather_ffn (up/down rows of |silu(gate)| > thr)
  cats_fused   fused_gather_ffn: gate GEMV + gathered up/down in one kernel
  mcd          cuBLAS up, then gather_ffn (gate/down rows of |up| > thr)       M-COUNTDOWN
  mcd_fused    fused_gather_ffn(dense="up")
  dideal       cuBLAS gate and up, silu*mul, then sparse_down                   D-COUNTDOWN ideal
  dideal_fused coefficient_ffn: gate and up GEMVs + gathered down in one kernel
  dprac        predicted_sparse_ffn with the mask given                          D-COUNTDOWN practical
Weights rotate over 8 layer copies (8 x 470 MB, far beyond the 50 MB L2). Each timing is one CUDA
graph that runs the 8 layers in sequence, timed by triton.testing.do_bench (median, L2 flushed
before each replay) and divided by 8; eager (no graph) times are reported for dense and the fused
paths as well. Thresholds are per-layer quantiles of each method's score for that layer's token.

Ratios are dense time / path time. The ideal ratio comes from the bytes each path must read
(CATS/M: 3/(1+2(1-s)); D ideal: 3/(2+(1-s)); D practical: 1/(1-s)). GB/s counts the weight bytes
actually read (the kept rows as counted from the mask). The last lines printed are the table; with
$OUT set, results.json and results.md are written there.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import multiprocessing as mp
import os
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SHAPES = {"llama3-8b": (4096, 14336), "llama2-7b": (4096, 11008)}
SPARSITIES = (0.0, 0.5, 0.7, 0.9)
LAYERS = 8
DTYPE = torch.bfloat16
PATHS = ("cats", "cats_fused", "mcd", "mcd_fused", "dideal", "dideal_fused", "dprac")


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------
# kernel-path descriptions: (kind, compute, score_act, which given vector)


def path_kernel(path):
    from countdown.kernels import _core as C

    return {
        "cats": (C.KIND_GATE, False, True), "cats_fused": (C.KIND_GATE, True, True),
        "mcd": (C.KIND_UP, False, False), "mcd_fused": (C.KIND_UP, True, False),
        "dideal": (C.KIND_T, False, False), "dideal_fused": (C.KIND_T, True, False),
        "dprac": (C.KIND_SCORE, False, False),
    }[path]


# the countdown method each path serves: its byte count comes from the method's own declaration
PATH_METHOD = {"dense": "dense", "cats": "cats", "mcd": "m-countdown", "dideal": "d-countdown-ideal",
               "dprac": "d-countdown"}


def _method(path):
    from countdown.methods import get_method

    return get_method(PATH_METHOD[path.replace("_fused", "")])


def ideal_ratio(path, s):
    return 1 / _method(path).ffn_bytes_read("gated", {"coef": s})


def bytes_read(path, hidden, inter, kept):
    return 3 * inter * hidden * 2 * _method(path).ffn_bytes_read("gated", {"coef": 1 - kept / inter})


# ------------------------------------------------------------------------------------------
# sweep variants


def variants(path):
    """The shipped configuration of this path first, then one-knob changes around it."""
    from countdown.kernels import _core as C

    kind, compute, _ = path_kernel(path)
    base = C._GPU_CONFIGS[(kind, compute)]
    if compute:  # (16 warps starve phase 1: 2026-11-22 sweeps)
        alts = [dict(interleave=not base.interleave), dict(block_d=4 if base.block_d != 4 else 8),
                dict(block_i=8), dict(pipe=not base.pipe, block_i=2), dict(block_d=2, prefetch=True)]
    else:
        alts = [dict(chunk=128 if base.chunk != 128 else 256), dict(block_i=8 if base.block_i != 8 else 4),
                dict(programs_per_sm=3 - base.programs_per_sm), dict(pipe=not base.pipe, block_i=2),
                dict(num_warps=24 - base.num_warps), dict(balance=True), dict(ncopy=4)]
    out = [base]
    for a in alts:
        v = dataclasses.replace(base, **a)
        if v not in out:
            out.append(v)
    return out


def _compile_job(job):
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    from countdown.kernels import _core as C

    kind, compute, score_act, vec_dtype, hidden, inter, cfg = job
    t0 = time.time()
    try:
        C.compile_kernel(kind, compute, DTYPE, vec_dtype, hidden, inter, "silu", score_act, True, cfg)
    except Exception as e:  # reported, and the main process compiles it again itself
        return f"FAILED {job}: {e!r}"
    return time.time() - t0


def precompile(jobs, workers):
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        res = list(ex.map(_compile_job, jobs))
    fails = [r for r in res if isinstance(r, str)]
    for f in fails:
        log(f)
    secs = [r for r in res if not isinstance(r, str)]
    log(f"precompiled {len(secs)}/{len(jobs)} kernels in {time.time() - t0:.1f}s "
        f"(per kernel {min(secs, default=0):.1f}-{max(secs, default=0):.1f}s, {workers} processes)")


# ------------------------------------------------------------------------------------------
# data


class Layer:
    def __init__(self, hidden, inter, seed, device):
        g = torch.Generator(device=device).manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32)  # noqa: E731
        self.x = r(hidden).to(DTYPE)
        self.wg = (r(inter, hidden) / hidden**0.5).to(DTYPE)
        self.wu = (r(inter, hidden) / hidden**0.5).to(DTYPE)
        self.wd = (r(hidden, inter) / inter**0.5).to(DTYPE)
        self.wdt = self.wd.t().contiguous()
        xf = self.x.float()
        self.g32 = xf @ self.wg.float().t()
        self.u32 = xf @ self.wu.float().t()
        self.t32 = F.silu(self.g32) * self.u32
        # the vectors the "given" paths receive, as the dense torch ops produce them (bf16)
        self.g = F.linear(self.x, self.wg)
        self.u = F.linear(self.x, self.wu)
        self.t = F.silu(self.g) * self.u
        self.score = self.t32.abs()  # D-practical: an oracle predictor's scores (the mask is given)

    def score_of(self, path):
        base = path.replace("_fused", "")
        if base == "cats":
            return F.silu(self.g.float() if path == "cats" else self.g32).abs()
        if base == "mcd":
            return (self.u.float() if path == "mcd" else self.u32).abs()
        if base == "dideal":
            return (self.t.float() if path == "dideal" else self.t32).abs()
        return self.score


# ------------------------------------------------------------------------------------------
# timing


def time_layers(fn, graph=True, layers=None):
    """Median microseconds per layer of fn(l) for l in range(layers) (default LAYERS), as one CUDA graph
    (or eager).
    Without a GPU (a dry run of a bench script) one eager pass is timed on the host: the code path only."""
    n = layers or LAYERS
    for l in range(n):
        fn(l)
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for l in range(n):
            fn(l)
        return (time.perf_counter() - t) * 1e6 / n
    torch.cuda.synchronize()
    if not graph:
        ms = triton.testing.do_bench(lambda: [fn(l) for l in range(n)], warmup=25, rep=100,
                                     return_mode="median")
        return ms * 1e3 / n
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for l in range(n):
            fn(l)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [fn(l) for l in range(n)]  # noqa: F841 (kept alive with the graph)
    ms = triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")
    del g
    return ms * 1e3 / n


def copy_bandwidth():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * n / (ms * 1e-3) / 1e9


def rel_err(out, ref):
    out = out.float().flatten()
    ref = ref.float().flatten()
    return float((out - ref).norm() / ref.norm()) if torch.isfinite(out).all() else float("inf")


# ------------------------------------------------------------------------------------------
# the paths


def make_path(path, layers, thr, cfg=None, kernel_only=False):
    """fn(l) -> y for layer l. thr[l]: fp32 [1] threshold tensor. cfg: force a launch config
    (sweep; calls the launcher directly). kernel_only: for the given-vector paths, skip the dense
    torch part (the vector is precomputed)."""
    from countdown import kernels as K
    from countdown.kernels import _core as C

    if path == "dense":
        def fn(l):
            L = layers[l]
            return F.linear(F.silu(F.linear(L.x, L.wg)) * F.linear(L.x, L.wu), L.wd)
        return fn
    kind, compute, score_act = path_kernel(path)
    if cfg is not None:
        def vec_of(L):
            if kind == C.KIND_GATE:
                return L.g
            if kind == C.KIND_UP:
                return L.u
            if kind == C.KIND_T:
                return L.t
            return L.score

        def fn(l):
            L = layers[l]
            vec = None if compute else (vec_of(L) if kernel_only else _dense_part(path, L))
            return C.launch(kind, compute, L.x, vec, L.wg, L.wu, L.wdt, thr[l], 0.0, "silu", score_act,
                            DTYPE, config=cfg)
        return fn

    def fn(l):
        L = layers[l]
        if path == "cats":
            return K.gather_ffn(L.x, F.linear(L.x, L.wg), L.wu, L.wdt, thr[l], dense="gate")
        if path == "cats_fused":
            return K.fused_gather_ffn(L.x, L.wg, L.wu, L.wdt, thr[l], dense="gate")
        if path == "mcd":
            return K.gather_ffn(L.x, F.linear(L.x, L.wu), L.wg, L.wdt, thr[l], dense="up")
        if path == "mcd_fused":
            return K.fused_gather_ffn(L.x, L.wu, L.wg, L.wdt, thr[l], dense="up")
        if path == "dideal":
            return K.sparse_down(F.silu(F.linear(L.x, L.wg)) * F.linear(L.x, L.wu), L.wdt, thr[l])
        if path == "dideal_fused":
            return K.coefficient_ffn(L.x, L.wg, L.wu, L.wdt, thr[l])
        return K.predicted_sparse_ffn(L.x, L.score, L.wg, L.wu, L.wdt, thr[l])
    return fn


def _dense_part(path, L):
    if path == "cats":
        return F.linear(L.x, L.wg)
    if path == "mcd":
        return F.linear(L.x, L.wu)
    if path == "dideal":
        return F.silu(F.linear(L.x, L.wg)) * F.linear(L.x, L.wu)
    return L.score


def reference_of(path, L, thr):
    from countdown.kernels import reference as R

    if path == "dense":
        return R.dense_ffn(L.x, L.wg, L.wu, L.wdt)
    if path == "cats":
        return R.gather_ffn(L.x, L.g, L.wu, L.wdt, thr, dense="gate")
    if path == "cats_fused":
        return R.fused_gather_ffn(L.x, L.wg, L.wu, L.wdt, thr, dense="gate")
    if path == "mcd":
        return R.gather_ffn(L.x, L.u, L.wg, L.wdt, thr, dense="up")
    if path == "mcd_fused":
        return R.fused_gather_ffn(L.x, L.wu, L.wg, L.wdt, thr, dense="up")
    if path == "dideal":
        return R.sparse_down(L.t, L.wdt, thr)
    if path == "dideal_fused":
        return R.coefficient_ffn(L.x, L.wg, L.wu, L.wdt, thr)
    return R.predicted_sparse_ffn(L.x, L.score, L.wg, L.wu, L.wdt, thr)


def thresholds(path, layers, s):
    from countdown.kernels.reference import midpoint_threshold

    thr = [torch.tensor([midpoint_threshold(L.score_of(path), s)], device="cuda") for L in layers]
    kept = sum(int((L.score_of(path) > t).sum()) for L, t in zip(layers, thr)) / len(layers)
    return thr, kept


# ------------------------------------------------------------------------------------------


def sweep(layers, hidden, inter, results):
    """Time every variant of every path (kernel only) at s=0 and s=0.9; return the best per path."""
    best = {}
    for path in PATHS:
        rows = []
        for cfg in variants(path):
            rec = {"path": path, "config": dataclasses.asdict(cfg)}
            try:
                # s=1 (nothing kept) on the shipped configuration: the fixed cost of a launch, or
                # for the fused paths the dense phase alone
                for s in (0.0, 0.9) + ((1.0,) if not rows else ()):
                    thr, kept = thresholds(path, layers, s)
                    fn = make_path(path, layers, thr, cfg=cfg, kernel_only=True)
                    y = fn(0)
                    ref = reference_of(path, layers[0], thr[0])
                    y2 = fn(0)
                    if s < 1.0:
                        rec[f"err_s{s}"] = rel_err(y, ref)
                        rec[f"repeat_diff_s{s}"] = rel_err(y2, y) if rel_err(y, ref) < 1 else None
                    elif not (torch.equal(y, torch.zeros_like(y)) and torch.equal(y2, y)):
                        rec["err_s1.0"] = "nonzero output with nothing kept"
                    rec[f"us_s{s}"] = time_layers(fn)
                    rec[f"kept_s{s}"] = kept
            except Exception as e:  # a variant that fails to build or run is reported, not fatal
                rec["error"] = repr(e)[:300]
            rows.append(rec)
            results["sweep"].append(rec)
            log(f"  sweep {path:13s} {_cfg_str(cfg):58s} "
                + (" ".join(f"s{s}: {rec.get(f'us_s{s}', float('nan')):7.1f}us "
                            f"err {rec.get(f'err_s{s}', float('nan')):.1e}" for s in (0.0, 0.9))
                   if "error" not in rec else rec["error"])
                + (f" | s1.0 (nothing kept): {rec['us_s1.0']:.1f}us" if "us_s1.0" in rec else ""))
        ok = [r for r in rows if "error" not in r and max(r["err_s0.0"], r["err_s0.9"]) < 2e-2]
        if not ok:
            continue
        b0 = min(r["us_s0.0"] for r in ok)
        b9 = min(r["us_s0.9"] for r in ok)
        pick = min(ok, key=lambda r: (max(r["us_s0.0"] / b0, r["us_s0.9"] / b9), r["us_s0.0"] / b0 + r["us_s0.9"] / b9))
        best[path] = pick["config"]
        log(f"  best {path}: {_cfg_str(pick['config'])}")
    return best


def _cfg_str(c):
    c = c if isinstance(c, dict) else dataclasses.asdict(c)
    return (f"pps{c['programs_per_sm']} bd{c['block_d']} bi{c['block_i']} ch{c['chunk']} w{c['num_warps']}"
            f"{'' if c['balance'] else ' nobal'}{'' if c['interleave'] else ' nointl'}"
            f"{' prefetch' if c['prefetch'] else ''}{' pipe' if c['pipe'] else ''} fin{c['finalize']} nc{c['ncopy']}")


@triton.jit
def _probe_empty_kernel(out_ptr):
    """Nothing but a launch (one program stores, so the kernel is not empty)."""
    if tl.program_id(0) == 0:
        tl.store(out_ptr, 1.0)


@triton.jit
def _probe_reduce_kernel(ws_ptr, cnt_ptr, out_ptr, H, H_PAD: tl.constexpr, NCOPY: tl.constexpr,
                         TICKET: tl.constexpr):
    """The end of _sparse_ffn_kernel alone: each program adds an H-row of ones into the workspace."""
    pid = tl.program_id(0)
    hoffs = tl.arange(0, H_PAD)
    hm = hoffs < H
    acc = tl.full([H_PAD], 1.0, tl.float32)
    tl.atomic_add(ws_ptr + (pid % NCOPY) * H + hoffs, acc, mask=hm, sem="relaxed")
    if TICKET:
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) - 1:
            tot = tl.zeros([H_PAD], dtype=tl.float32)
            for g in tl.static_range(NCOPY):
                tot += tl.atomic_add(ws_ptr + g * H + hoffs, tl.zeros([H_PAD], dtype=tl.float32), mask=hm,
                                     sem="relaxed")
            for g in tl.static_range(NCOPY):
                tl.store(ws_ptr + g * H + hoffs, tl.zeros([H_PAD], dtype=tl.float32), mask=hm)
            tl.store(cnt_ptr, 0)
            tl.store(out_ptr + hoffs, tot.to(tl.bfloat16), mask=hm)


def overhead_probe(hidden, results):
    """Fixed costs of one launch, apart from any weight traffic: an empty kernel of one program per
    SM, and the end-of-kernel reduction alone (every program adds an H-row of fp32 into the
    workspace; ticket; the last program casts), as 8 launches in a CUDA graph."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ws = torch.zeros(8 * hidden + 1, dtype=torch.float32, device="cuda")
    cnt = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.empty(hidden, dtype=DTYPE, device="cuda")
    probes = {"empty kernel (132 programs)": lambda l: _probe_empty_kernel[(sms,)](out, num_warps=8)}
    for nc in (1, 4):
        probes[f"atomics only, ncopy={nc}"] = (lambda nc: lambda l: _probe_reduce_kernel[(sms,)](
            ws, cnt, out, hidden, H_PAD=triton.next_power_of_2(hidden), NCOPY=nc, TICKET=False, num_warps=8))(nc)
        probes[f"atomics + ticket + cast, ncopy={nc}"] = (lambda nc: lambda l: _probe_reduce_kernel[(sms,)](
            ws, cnt, out, hidden, H_PAD=triton.next_power_of_2(hidden), NCOPY=nc, TICKET=True, num_warps=8))(nc)
    probes["torch.zeros(H+1) memset"] = lambda l: torch.zeros(hidden + 1, dtype=torch.int32, device="cuda")
    for name, fn in probes.items():
        us = time_layers(fn)
        results.setdefault("probe", {})[name] = us
        log(f"  probe {name:40s} {us:6.2f} us per launch")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape, s in {0, 0.9}, no sweep")
    ap.add_argument("--no-sweep", action="store_true", help="time the shipped configurations only")
    ap.add_argument("--eager", action="store_true", help="also time every path without CUDA graphs")
    ap.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    args = ap.parse_args()

    from countdown.kernels import _core as C

    dev = torch.cuda.get_device_properties(0)
    info = {"gpu": dev.name, "sms": dev.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "cuda": torch.version.cuda}
    log("device:", info)
    results = {"info": info, "sweep": [], "table": [], "checks": []}
    out_dir = os.environ.get("OUT")

    shapes = {"llama3-8b": SHAPES["llama3-8b"]} if args.quick else SHAPES
    sparsities = (0.0, 0.9) if args.quick else SPARSITIES
    do_sweep = not (args.quick or args.no_sweep)

    # compile everything in parallel processes first (kernels land in Triton's disk cache)
    jobs = []
    for path in PATHS:
        kind, compute, score_act = path_kernel(path)
        vec_dtype = torch.float32 if path == "dprac" else DTYPE
        cfgs = variants(path) if do_sweep else []
        for hidden, inter in shapes.values():
            for cfg in cfgs + [C.pick_config(kind, compute, hidden, inter, torch.device("cuda"))]:
                jobs.append((kind, compute, score_act, vec_dtype, hidden, inter, cfg))
    jobs = list(dict.fromkeys(jobs))
    precompile(jobs, args.workers)

    overhead_probe(4096, results)
    bw = copy_bandwidth()
    info["copy_GBps"] = bw
    log(f"copy bandwidth (read + write): {bw:.0f} GB/s")

    table = []
    for shape_name, (hidden, inter) in shapes.items():
        t0 = time.time()
        layers = [Layer(hidden, inter, seed=100 + i, device="cuda") for i in range(LAYERS)]
        torch.cuda.synchronize()
        log(f"\n== {shape_name}: H={hidden} I={inter}, {LAYERS} layers built in {time.time() - t0:.1f}s")
        if do_sweep and shape_name == "llama3-8b":
            best = sweep(layers, hidden, inter, results)
            results["best_configs"] = best
            for path, cfgd in best.items():
                kind, compute, _ = path_kernel(path)
                C._GPU_CONFIGS[(kind, compute)] = C.KernelConfig(**cfgd)
        # correctness of the public ops on this device
        for path in ("dense",) + PATHS:
            thr, _ = thresholds(path if path != "dense" else "dprac", layers, 0.5)
            fn = make_path(path, layers, thr)
            err = rel_err(fn(1), reference_of(path, layers[1], thr[1]))
            results["checks"].append({"shape": shape_name, "path": path, "s": 0.5, "rel_err": err})
            log(f"  check {path:13s} s=0.5 rel err {err:.2e}")
        dense_us = time_layers(make_path("dense", layers, None))
        dense_eager = time_layers(make_path("dense", layers, None), graph=False)
        dbytes = bytes_read("dense", hidden, inter, inter)
        table.append(dict(shape=shape_name, path="dense", s=0.0, us=dense_us, eager_us=dense_eager, ratio=1.0,
                          ideal=1.0, of_ideal=1.0, GBps=dbytes / dense_us / 1e3, kept=inter))
        log(f"  dense {dense_us:.1f}us (eager {dense_eager:.1f}us) {dbytes / dense_us / 1e3:.0f} GB/s")
        for path in PATHS:
            for s in sparsities:
                thr, kept = thresholds(path, layers, s)
                fn = make_path(path, layers, thr)
                us = time_layers(fn)
                with_eager = args.eager or path.endswith("fused") or path == "dprac"
                eager = time_layers(fn, graph=False) if with_eager else None
                nbytes = bytes_read(path, hidden, inter, kept)
                ideal = ideal_ratio(path, s)
                row = dict(shape=shape_name, path=path, s=s, us=us, eager_us=eager, ratio=dense_us / us, ideal=ideal,
                           of_ideal=dense_us / us / ideal, GBps=nbytes / us / 1e3, kept=kept)
                table.append(row)
                log(f"  {path:13s} s={s:.1f} {us:7.1f}us ratio {row['ratio']:.2f} (ideal {ideal:.2f}, "
                    f"{100 * row['of_ideal']:.0f}%) {row['GBps']:.0f} GB/s"
                    + (f" eager {eager:.1f}us" if eager else ""))
        del layers
        torch.cuda.empty_cache()
    results["table"] = table

    md = render(table, info)
    if out_dir:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(out_dir, "results.md"), "w") as f:
            f.write(md)
    log("\n" + md)


def render(table, info):
    lines = [f"{info['gpu']}, torch {info['torch']}, triton {info['triton']}, "
             f"copy {info.get('copy_GBps', 0):.0f} GB/s; "
             "us per FFN layer (CUDA graph of 8 layers, median); ratio = dense/path; % of ideal ratio",
             "", "| shape | path | s | us | ratio | ideal | % ideal | GB/s | eager us |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        eager = f"{r['eager_us']:.1f}" if r.get("eager_us") else ""
        lines.append(f"| {r['shape']} | {r['path']} | {r['s']:.1f} | {r['us']:.1f} | {r['ratio']:.2f} "
                     f"| {r['ideal']:.2f} "
                     f"| {100 * r['of_ideal']:.0f}% | {r['GBps']:.0f} | {eager} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
