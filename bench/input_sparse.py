"""Input-sparse GEMV (TEAL / WINA) benchmark at decode batch sizes: check, sweep, time, table.

    PYTHONPATH=. python3 bench/input_sparse.py            # about 3-4 min on an H100

Llama-3-8B linear shapes (K -> N), bf16: o_proj 4096->4096, k/v 4096->1024, fused qkv 4096->6144,
gate/up 4096->14336, down 14336->4096; batch B in 1, 2, 4, 8, 16.
1. Check: ``input_sparse_linear`` (shipped configuration) against ``reference.input_sparse_linear`` on
   fresh random data at every shape and batch (TEAL at sparsity 0.5, WINA at 0.7, and sparsity 0
   against F.linear), outputs poisoned with NaN first.
2. Sweep: candidate launch configurations per shape, timed at B=1 (sparsity 0 and 0.5) and at B=8
   (sparsity 0 and 0.5); each is checked before it is timed. The best (smallest sum) is used below.
3. Table: per shape, batch and input sparsity s in {0, 0.25, 0.5, 0.7} (threshold = the s-quantile of
   the random |x|, each token its own mask), the kernel against dense cuBLAS ``F.linear(x, W)`` on the
   standard [N, K] weight. Each timing is one CUDA graph over C weight copies (C * size > 150 MB,
   beyond the 50 MB L2), timed by triton.testing.do_bench (median, L2 flushed), divided by C.
   floor = bytes / 3.0 TB/s with bytes = (rows any token keeps) * N * 2 (dense: K * N * 2);
   % floor = floor / time; GB/s = bytes / time. ``dense_wt`` is F.linear on the view w_t.t() (the
   fallback when the model keeps only w_t).
Writes $OUT/input_sparse.json (everything) and prints the table last.

    PYTHONPATH=. python3 bench/input_sparse.py --variants   # walk kernel vs prefetch variants, < 4 min

``--variants`` (issue 13 follow-up) times, in one process, the shipped walk kernel against the prefetch
kernel (``countdown/kernels/input_sparse_prefetch.py``) in the configurations of ``VARIANTS``, at the
shapes above: every batch at s=0.5, B=1 and 16 at s=0 too; then q, k, v of Llama-3-8B (4096->4096,
1024, 1024) and TEAL's gate + up (4096->14336 twice) as one launch per weight (walk, prefetch) and as one
``input_sparse_multi`` launch per prefetch configuration; and each shape with half its channels, dense
(s=0, B=1): the bytes a 50% call keeps with no mask, so a sparse call's gap to its floor splits into
what the mask costs and what the smaller size costs. ``BENCH_VARIANTS=walk,pf`` times only those. Every variant is first checked against the reference at every shape and batch (TEAL
s=0.5 and WINA s=0.7, outputs poisoned with NaN); a wrong one is not timed. Cells run by priority (B=1
s=0.5 first) and no new cell starts after BENCH_BUDGET_S seconds (default 200). Same timing and floor
as the table above. Writes $OUT/input_sparse_variants.json and prints its table last.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import math
import multiprocessing as mp
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

from countdown.kernels import input_sparse as isp
from countdown.kernels import input_sparse_prefetch as ispf
from countdown.kernels import reference
from countdown.kernels import _core
from countdown.kernels._core import set_pdl

SHAPES = {"o_proj": (4096, 4096), "k/v": (4096, 1024), "qkv": (4096, 6144), "gate/up": (4096, 14336),
          "down": (14336, 4096)}
BATCHES = (1, 2, 4, 8, 16)
SPARSITIES = (0.0, 0.25, 0.5, 0.7)
BW = 3.0e12
DT = torch.bfloat16
OUT = os.environ.get("OUT", ".")
C_ = isp.InputSparseConfig
CANDIDATES = {
    "default": isp._GPU_CONFIG,
    "m-dot-256x64-s3": C_(block_n=256, block_k=64, num_warps=4, num_stages=3, programs_per_sm=2),
    "m-dot-128x64-s4": C_(block_n=128, block_k=64, num_warps=4, num_stages=4, programs_per_sm=2),
    "m-dot-256x32-s4": C_(block_n=256, block_k=32, num_warps=4, num_stages=4, programs_per_sm=2),
    "m-dot-512x64-s3-w8": C_(block_n=512, block_k=64, num_warps=8, num_stages=3, programs_per_sm=1),
    "m-dot-128x128-s3": C_(block_n=128, block_k=128, num_warps=4, num_stages=3, programs_per_sm=2),
    "m-dot-64x128-s4-p4": C_(block_n=64, block_k=128, num_warps=4, num_stages=4, programs_per_sm=4),
    "m-fma-256x16-s3": C_(block_n=256, block_k=16, num_warps=4, num_stages=3, programs_per_sm=2, dot=False),
    "m-fma-512x16-s3-w8": C_(block_n=512, block_k=16, num_warps=8, num_stages=3, programs_per_sm=2, dot=False),
    "c-dot-256x32": C_(block_n=256, block_k=32, num_warps=4, num_stages=1, programs_per_sm=2, compact=True,
                       chunk=128),
    "c-fma-512x8-w8": C_(block_n=512, block_k=8, num_warps=8, num_stages=1, programs_per_sm=2, compact=True,
                         chunk=128, dot=False),
}
# BENCH_SMOKE=1: tiny shapes on the CPU in Triton's interpreter, no graphs (checks this script's logic)
SMOKE = os.environ.get("BENCH_SMOKE") == "1"
DEV = "cpu" if SMOKE else "cuda"
if SMOKE:
    SHAPES = {"o_proj": (64, 48), "down": (96, 32)}
    BATCHES = (1, 2)
    CANDIDATES = {"default": isp._INTERPRET_CONFIG,
                  "c": C_(block_n=16, block_k=16, num_stages=1, programs_per_sm=8, compact=True, chunk=32)}
RESULTS: dict = {"check": [], "sweep": [], "table": [], "info": {}}


def log(*a):
    print(*a, flush=True)


def save():
    with open(os.path.join(OUT, "input_sparse.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def rel_err(out, ref):
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _compile_job(job):
    """Compile one variant by running it once on a small problem of the same specialisation."""
    name, batch, wina = job
    cfg = CANDIDATES[name]
    try:
        x = torch.randn(batch, 4096, device=DEV, dtype=DT)
        w = torch.randn(4096, 4096, device=DEV, dtype=DT)
        sc = torch.rand(4096, device=DEV) if wina else None
        thr = torch.ones(1, device=DEV)
        out = torch.empty(batch, 4096, device=DEV, dtype=DT)
        isp._launch(x, w, sc, thr, 0.0, out, cfg)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 (reported; the config is then skipped)
        return f"{name} B={batch}: {type(e).__name__}: {str(e)[:200]}"


def precompile():
    t0 = time.time()
    jobs = [(n, b, False) for n in CANDIDATES for b in (1, 8)] + [("default", b, True) for b in (1, 8)]
    with cf.ProcessPoolExecutor(max_workers=14, mp_context=mp.get_context("spawn")) as ex:
        res = list(ex.map(_compile_job, jobs))
    bad = set()
    for job, r in zip(jobs, res):
        if r is not None:
            log("compile FAILED", r)
            bad.add(job[0])
    log(f"precompiled {len(jobs)} variants in {time.time() - t0:.1f}s")
    return bad


def bench_graph(fn, copies):
    if SMOKE:
        t0 = time.perf_counter()
        for c in range(copies):
            fn(c)
        return (time.perf_counter() - t0) * 1e6 / copies
    for c in range(copies):
        fn(c)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in range(copies):
            fn(c)
    ms = triton.testing.do_bench(g.replay, warmup=20, rep=60, return_mode="median")
    del g
    return ms * 1e3 / copies


class Shape:
    def __init__(self, k, n, seed):
        self.k, self.n = k, n
        size = k * n * 2
        self.copies = 2 if SMOKE else max(3, math.ceil(150e6 / size))
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.w = [(torch.randn(n, k, device=DEV, generator=g) / k**0.5).to(DT) for _ in range(self.copies)]
        self.w_t = [w.t().contiguous() for w in self.w]
        self.out = torch.empty(16, n, device=DEV, dtype=DT)

    def x_and_thr(self, batch, s, seed):
        g = torch.Generator(device=DEV).manual_seed(seed)
        x = torch.randn(batch, self.k, device=DEV, generator=g).to(DT)
        thr = reference.midpoint_threshold(x.abs(), s)
        kept = int((x.float().abs() > thr).any(0).sum())
        return x, torch.tensor([thr], device=DEV), kept

    def kernel_fn(self, x, thr, cfg):
        out = self.out[: x.shape[0]]
        return lambda c: isp._launch(x, self.w_t[c], None, thr, 0.0, out, cfg)

    def dense_fn(self, x, transposed=False):
        return (lambda c: F.linear(x, self.w_t[c].t())) if transposed else (lambda c: F.linear(x, self.w[c]))


def check_all():
    for name, (k, n) in SHAPES.items():
        for batch in BATCHES:
            x = torch.randn(batch, k, device=DEV).to(DT)
            w_t = (torch.randn(k, n, device=DEV) / k**0.5).to(DT)
            sc = torch.rand(k, device=DEV) + 0.25
            row = {"shape": name, "B": batch}
            thr = reference.midpoint_threshold(x.abs(), 0.5)
            out = torch.full((batch, n), float("nan"), device=DEV, dtype=DT)
            isp.input_sparse_linear(x, w_t, thr, out=out)
            row["teal_0.5"] = rel_err(out, reference.input_sparse_linear(x, w_t, thr))
            thr_w = torch.tensor([reference.midpoint_threshold(x.float().abs() * sc, 0.7)], device=DEV)
            y = isp.input_sparse_linear(x, w_t, thr_w, channel_scale=sc)
            row["wina_0.7"] = rel_err(y, reference.input_sparse_linear(x, w_t, thr_w, channel_scale=sc))
            y = isp.input_sparse_linear(x, w_t, -1.0)
            row["dense_vs_F.linear"] = rel_err(y, F.linear(x.float(), w_t.t().float()).to(DT))
            RESULTS["check"].append(row)
    worst = {key: max(r[key] for r in RESULTS["check"]) for key in ("teal_0.5", "wina_0.7", "dense_vs_F.linear")}
    log("check (max rel err over shapes x batches):", {k: f"{v:.2e}" for k, v in worst.items()})
    RESULTS["info"]["check_worst"] = worst
    save()


def sweep(shapes, bad):
    best = {}
    for name, sh in shapes.items():
        scores = {}
        for batch in (1, 8):
            for cname, cfg in CANDIDATES.items():
                if cname in bad or (batch > 1 and not cfg.dot and cname != "default"):
                    continue
                xs = [sh.x_and_thr(batch, s, seed=11 + batch) for s in (0.0, 0.5)]
                x, thr, _ = xs[1]
                out = torch.full((batch, sh.n), float("nan"), device=DEV, dtype=DT)
                isp._launch(x, sh.w_t[0], None, thr, 0.0, out, cfg)
                err = rel_err(out, reference.input_sparse_linear(x, sh.w_t[0], thr))
                if err > 1e-2:
                    log(f"sweep {name} B={batch} {cname}: WRONG rel err {err:.2e}, skipped")
                    RESULTS["sweep"].append(dict(shape=name, B=batch, config=cname, err=err))
                    continue
                ts = [bench_graph(sh.kernel_fn(x_, t_, cfg), sh.copies) for x_, t_, _ in xs]
                RESULTS["sweep"].append(dict(shape=name, B=batch, config=cname, err=err, us_s0=ts[0], us_s05=ts[1]))
                scores.setdefault(batch, {})[cname] = sum(ts)
        best[name] = {b: min(sc, key=sc.get) for b, sc in scores.items()}
        log(f"sweep {name}: " + "; ".join(
            f"B={b}: " + ", ".join(f"{c} {v / 2:.1f}" for c, v in sorted(sc.items(), key=lambda kv: kv[1])[:4])
            for b, sc in scores.items()) + "  (mean of s=0, 0.5, us)")
        save()
    RESULTS["info"]["best"] = best
    return best


def table(shapes, best):
    rows = []
    for name, sh in shapes.items():
        for batch in BATCHES:
            cname = best[name][1 if batch == 1 else 8]
            cfg = CANDIDATES[cname]
            x, _, _ = sh.x_and_thr(batch, 0.0, seed=batch)
            dense = bench_graph(sh.dense_fn(x), sh.copies)
            dense_wt = bench_graph(sh.dense_fn(x, transposed=True), sh.copies)
            dense_bytes = sh.k * sh.n * 2
            for s in SPARSITIES:
                x, thr, kept = sh.x_and_thr(batch, s, seed=1000 * batch + int(100 * s))
                us = bench_graph(sh.kernel_fn(x, thr, cfg), sh.copies)
                nbytes = kept * sh.n * 2
                r = dict(shape=name, K=sh.k, N=sh.n, B=batch, s=s, config=cname, kept_rows=kept, us=us,
                         dense_us=dense, dense_wt_us=dense_wt, speedup=dense / us, floor_us=nbytes / BW * 1e6,
                         pct_floor=100 * nbytes / BW * 1e6 / us, gbs=nbytes / us / 1e3,
                         dense_pct_floor=100 * dense_bytes / BW * 1e6 / dense)
                rows.append(r)
                RESULTS["table"].append(r)
            save()
    return rows


def main():
    torch.manual_seed(0)
    if not SMOKE:
        props = torch.cuda.get_device_properties(0)
        RESULTS["info"].update(gpu=props.name, sms=props.multi_processor_count)
    RESULTS["info"].update(torch=torch.__version__, triton=triton.__version__, date=time.strftime("%Y-%m-%d"))
    log(RESULTS["info"])
    bad = set() if SMOKE else precompile()
    check_all()
    shapes = {name: Shape(k, n, seed=i) for i, (name, (k, n)) in enumerate(SHAPES.items())}
    best = sweep(shapes, bad)
    rows = table(shapes, best)
    log("\nInput-sparse GEMV, bf16, us per call (CUDA graph over rotated weights, median); "
        "x = dense cuBLAS / kernel; %fl = % of byte floor (kept rows * N * 2 B / 3.0 TB/s)")
    log(f"{'shape':8} {'B':>2} {'dense':>6} {'d_wt':>6} {'%fl':>4} | "
        + " | ".join(f"s={s:<4} us    x   %fl  GB/s" for s in SPARSITIES) + " | config")
    for i in range(0, len(rows), len(SPARSITIES)):
        grp = rows[i: i + len(SPARSITIES)]
        r0 = grp[0]
        cells = " | ".join(f"{r['us']:7.1f} {r['speedup']:4.2f} {r['pct_floor']:4.0f} {r['gbs']:5.0f}" for r in grp)
        log(f"{r0['shape']:8} {r0['B']:>2} {r0['dense_us']:6.1f} {r0['dense_wt_us']:6.1f} "
            f"{r0['dense_pct_floor']:4.0f} | {cells} | {r0['config']}")


# --------------------------------------------------------------------------------------------
# --variants: the walk kernel against the prefetch kernel, one process

P_ = ispf.PrefetchConfig
VARIANTS = {  # name: ("walk" | "pf", config); "-s1": no channel split (no atomics, ticket, read-back)
    "walk": ("walk", isp._GPU_CONFIG),
    "walk-n32-s1": ("walk", C_(block_n=32, block_k=64, num_warps=4, num_stages=8, programs_per_sm=1)),
    "pf": ("pf", ispf._GPU_CONFIG),  # 256 x 32, pipeliner 4 stages, ~2 programs/SM, >= 128 channels each
    "pf-s6": ("pf", P_(num_stages=6)),  # more rows in flight per program
    "pf-manual": ("pf", P_(pipe="manual", num_stages=1)),  # next tile prefetched in registers instead
    "pf-n128": ("pf", P_(block_n=128, min_kpp=256)),  # narrower tiles, fewer splits
    "pf-n32-s1": ("pf", P_(block_n=32, block_k=64, num_stages=8, max_split=1)),
    "pf-n64-s1": ("pf", P_(block_n=64, block_k=64, num_stages=6, max_split=1)),
    "pf-w8-n512": ("pf", P_(block_n=512, num_warps=8)),  # wider tiles, 8 warps
    "pf-p4": ("pf", P_(programs_per_sm=4, min_kpp=64)),  # more, shorter programs
    "pf-k64-s3": ("pf", P_(block_k=64, num_stages=3)),  # longer steps, fewer of them
    # programmatic dependent launch: each call may start while the one before it drains
    "pf-pdl": ("pf-pdl", ispf._GPU_CONFIG),
    "pf-k64-s3-pdl": ("pf-pdl", P_(block_k=64, num_stages=3)),
}
if os.environ.get("BENCH_VARIANTS"):  # e.g. "walk,pf,pf-p4": time only these
    VARIANTS = {n: VARIANTS[n] for n in os.environ["BENCH_VARIANTS"].split(",")}
QKV = (4096, (4096, 1024, 1024))  # Llama-3-8B q, k, v (8 KV heads)
GATE_UP = (4096, (14336, 14336))  # TEAL's gate and up: one x, one threshold (input_sparse_linears)
# Half the channels of each shape, read densely (s = 0, batch 1): the bytes a 50%-sparse call keeps, with no
# mask at all. Against these the sparse call's gap splits into what sparsity costs and what the size costs.
HALF = {f"{name}/2": (k // 2, (n,)) for name, (k, n) in SHAPES.items()}
HALF.update({"q,k,v/2": (QKV[0] // 2, QKV[1]), "gate+up/2": (GATE_UP[0] // 2, GATE_UP[1])})
V_BATCHES = (1, 2, 4, 8, 16)
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "200"))
if SMOKE:
    VARIANTS = {"walk": ("walk", isp._INTERPRET_CONFIG), "pf": ("pf", ispf._INTERPRET_CONFIG),
                "pf-manual": ("pf", P_(block_n=16, block_k=16, num_stages=1, programs_per_sm=4, min_kpp=16,
                                       pipe="manual"))}
    QKV = (48, (48, 16, 16))
    GATE_UP = (48, (40, 40))
    HALF = {"o_proj/2": (32, (48,))}
    V_BATCHES = (1, 2)
VRESULTS: dict = {"check": [], "table": [], "qkv": [], "info": {}}


def vsave():
    with open(os.path.join(OUT, "input_sparse_variants.json"), "w") as f:
        json.dump(VRESULTS, f, indent=1)


def run_variant(name, x, w_ts, scales, thr, outs, fused=True):
    """One call of variant ``name`` on weights w_ts sharing x (several weights: fused or one launch each)."""
    kind, cfg = VARIANTS[name]
    default = _core.PDL
    set_pdl(kind == "pf-pdl")  # read at launch, so a captured graph keeps it
    try:
        if kind == "walk" or not fused:
            for w, sc, o in zip(w_ts, scales, outs):
                if kind == "walk":
                    isp._launch(x, w, sc, thr, 0.0, o, cfg)
                else:
                    ispf.launch(x, [w], [sc], [thr], [0.0], [o], cfg)
        else:
            ispf.launch(x, w_ts, scales, [thr] * len(w_ts), [0.0] * len(w_ts), outs, cfg)
    finally:
        set_pdl(default)


def _vcompile_job(job):
    """Compile variant ``name`` for one weight set and the batch buckets (1; 2-8; 16) by running it."""
    name, k, ns = job
    try:
        ws = [torch.randn(k, n, device=DEV, dtype=DT) for n in ns]
        thr = torch.ones(1, device=DEV)
        for batch in (1, 2, 16):
            x = torch.randn(batch, k, device=DEV, dtype=DT)
            outs = [torch.empty(batch, n, device=DEV, dtype=DT) for n in ns]
            run_variant(name, x, ws, [None] * len(ns), thr, outs)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 (reported; the variant is then skipped)
        return f"{name} K={k} N={ns}: {type(e).__name__}: {str(e)[:300]}"


def vprecompile():
    t0 = time.time()
    jobs = [(name, k, (n,)) for name in VARIANTS for k, n in SHAPES.values()]
    jobs += [(name, k, ns) for name in VARIANTS if VARIANTS[name][0] != "walk" for k, ns in (QKV, GATE_UP)]
    with cf.ProcessPoolExecutor(max_workers=14, mp_context=mp.get_context("spawn")) as ex:
        res = list(ex.map(_vcompile_job, jobs))
    bad = set()
    for job, r in zip(jobs, res):
        if r is not None:
            log("compile FAILED", r)
            bad.add(job[0])
    log(f"precompiled {len(jobs)} variant x shape jobs in {time.time() - t0:.1f}s")
    return bad


def vcheck(bad):
    """Every variant against the reference at every shape and batch; returns the variants that failed."""
    shapes = [(name, k, (n,)) for name, (k, n) in SHAPES.items()] + [("q,k,v", *QKV), ("gate+up", *GATE_UP)]
    for sname, k, ns in shapes:
        ws = [(torch.randn(k, n, device=DEV) / k**0.5).to(DT) for n in ns]
        scales = [torch.rand(k, device=DEV) + 0.25 for _ in ns]
        for batch in V_BATCHES:
            x = torch.randn(batch, k, device=DEV).to(DT)
            for wina, s in ((False, 0.5), (True, 0.7)):
                sc = scales if wina else [None] * len(ns)
                score = x.float().abs() * (scales[0] if wina else 1.0)
                thr_f = reference.midpoint_threshold(score, s)
                thr = torch.tensor([thr_f], device=DEV)
                refs = [reference.input_sparse_linear(x, w, thr_f, channel_scale=c) for w, c in zip(ws, sc)]
                for name in VARIANTS:
                    if name in bad:
                        continue
                    outs = [torch.full((batch, n), float("nan"), device=DEV, dtype=DT) for n in ns]
                    # several weights share one threshold here; each its own scale
                    run_variant(name, x, ws, sc, thr, outs)
                    err = max(rel_err(o, r) for o, r in zip(outs, refs))
                    VRESULTS["check"].append(dict(shape=sname, B=batch, wina=wina, variant=name, err=err))
                    if err > 1e-2:
                        log(f"check {sname} B={batch} wina={wina} {name}: WRONG rel err {err:.2e}")
                        bad.add(name)
    worst = {name: max(r["err"] for r in VRESULTS["check"] if r["variant"] == name) for name in VARIANTS}
    log("check (max rel err over shapes x batches x TEAL/WINA):", {k: f"{v:.1e}" for k, v in worst.items()})
    VRESULTS["info"]["check_worst"] = worst
    vsave()
    return bad


class WeightSet:
    """C copies (C * bytes > 150 MB, beyond L2) of weights that share x: [K, N_i] input-major and the
    nn.Linear [N_i, K] for cuBLAS."""

    def __init__(self, k, ns, seed):
        self.k, self.ns = k, ns
        size = k * sum(ns) * 2
        self.copies = 2 if SMOKE else max(3, math.ceil(150e6 / size))
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.w = [[(torch.randn(n, k, device=DEV, generator=g) / k**0.5).to(DT) for n in ns]
                  for _ in range(self.copies)]
        self.w_t = [[w.t().contiguous() for w in ws] for ws in self.w]
        self.outs = [torch.empty(16, n, device=DEV, dtype=DT) for n in ns]

    def fn(self, name, x, thr, fused=True):
        outs = [o[: x.shape[0]] for o in self.outs]
        none = [None] * len(self.ns)
        return lambda c: run_variant(name, x, self.w_t[c], none, thr, outs, fused)

    def dense_fn(self, x):
        return lambda c: [F.linear(x, w) for w in self.w[c]]


def vtime(sets, bad, t_start):
    # (weight set, B, s) by priority: the batch-1 target first, then s=0, then B=16, then the rest
    full = [sn for sn in sets if sn not in HALF]
    cells = [(sn, 1, 0.5) for sn in full] + [(sn, 1, 0.0) for sn in HALF if sn in sets] + \
            [(sn, 1, 0.0) for sn in full] + [(sn, 16, s) for s in (0.5, 0.0) for sn in full] + \
            [(sn, b, 0.5) for b in V_BATCHES if b not in (1, 16) for sn in full]
    dense = {}
    names = [n for n in VARIANTS if n not in bad]
    for sn, batch, s in cells:
        if batch not in V_BATCHES:
            continue
        if time.time() - t_start > BUDGET_S:
            log(f"budget of {BUDGET_S:.0f}s spent: {sn} B={batch} s={s} and later cells not run")
            VRESULTS["info"].setdefault("skipped", []).append([sn, batch, s])
            continue
        ws = sets[sn]
        g = torch.Generator(device=DEV).manual_seed(1000 * batch + int(100 * s))
        x = torch.randn(batch, ws.k, device=DEV, generator=g).to(DT)
        thr_f = reference.midpoint_threshold(x.abs(), s)
        thr = torch.tensor([thr_f], device=DEV)
        kept = int((x.float().abs() > thr_f).any(0).sum())
        nbytes = kept * sum(ws.ns) * 2
        if (sn, batch) not in dense:
            dense[(sn, batch)] = bench_graph(ws.dense_fn(x), ws.copies)
        row = dict(shape=sn, K=ws.k, N=list(ws.ns), B=batch, s=s, kept_rows=kept, floor_us=nbytes / BW * 1e6,
                   dense_us=dense[(sn, batch)], us={})
        if len(ws.ns) == 1:
            timed = [(n, n, True) for n in names]
        else:  # several weights: walk and pf one launch per weight, then every prefetch config fused
            timed = [(f"{n} x{len(ws.ns)}", n, False) for n in ("walk", "pf") if n in names]
            timed += [(n, n, True) for n in names if VARIANTS[n][0] != "walk"]
        for key, name, fused in timed:
            row["us"][key] = bench_graph(ws.fn(name, x, thr, fused), ws.copies)
        row["pct_floor"] = {k: 100 * row["floor_us"] / v for k, v in row["us"].items()}
        row["gbs"] = {k: nbytes / v / 1e3 for k, v in row["us"].items()}
        VRESULTS["qkv" if len(ws.ns) > 1 else "table"].append(row)
        vsave()
    return VRESULTS["table"] + VRESULTS["qkv"]


def vprint(rows):
    log(f"\nInput-sparse GEMV variants, bf16, us per call and % of byte floor (kept rows * N * 2 B / 3.0 TB/s); "
        f"CUDA graph over rotated weights, median; dense = cuBLAS F.linear")
    for group in ("table", "qkv"):
        grp = [r for r in rows if r in VRESULTS[group]]
        if not grp:
            continue
        keys = list(dict.fromkeys(k for r in grp for k in r["us"]))  # "walk x3" (q,k,v), "walk x2" (gate+up)
        log(f"{'shape':8} {'B':>2} {'s':>4} {'floor':>5} {'dense':>6} | " + " | ".join(f"{k:>14}" for k in keys)
            + " | best GB/s")
        for r in sorted(grp, key=lambda r: (r["shape"], r["B"], r["s"])):
            cells = " | ".join(f"{r['us'][k]:7.1f} {r['pct_floor'][k]:4.0f}% " if k in r["us"] else f"{'-':>14}"
                               for k in keys)
            best = min(r["us"], key=r["us"].get)
            log(f"{r['shape']:8} {r['B']:>2} {r['s']:4.2f} {r['floor_us']:5.1f} {r['dense_us']:6.1f} | {cells} | "
                f"{best} {r['gbs'][best]:.0f}")


def variants_main():
    t_start = time.time()
    torch.manual_seed(0)
    if not SMOKE:
        props = torch.cuda.get_device_properties(0)
        VRESULTS["info"].update(gpu=props.name, sms=props.multi_processor_count)
    VRESULTS["info"].update(torch=torch.__version__, triton=triton.__version__, date=time.strftime("%Y-%m-%d"),
                            variants={k: [kind, dataclasses.asdict(c)] for k, (kind, c) in VARIANTS.items()})
    log(VRESULTS["info"])
    bad = set() if SMOKE else vprecompile()
    bad = vcheck(bad)
    t0 = time.time()
    sets = {name: WeightSet(k, (n,), seed=i) for i, (name, (k, n)) in enumerate(SHAPES.items())}
    sets["q,k,v"] = WeightSet(QKV[0], QKV[1], seed=99)
    sets["gate+up"] = WeightSet(GATE_UP[0], GATE_UP[1], seed=98)
    for i, (name, (k, ns)) in enumerate(HALF.items()):
        sets[name] = WeightSet(k, ns, seed=200 + i)
    log(f"checked in {t0 - t_start:.1f}s; weights ready in {time.time() - t0:.1f}s")
    rows = vtime(sets, bad, t_start)
    VRESULTS["info"]["seconds"] = time.time() - t_start
    vsave()
    vprint(rows)
    log(f"total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    sys.exit(variants_main() if "--variants" in sys.argv[1:] else main())
