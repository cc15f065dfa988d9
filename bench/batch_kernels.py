"""Batched-decode benchmark (B = 1..16 tokens) of the sparse-FFN ops: check, sweep, time, table.

    PYTHONPATH=. python bench/batch_kernels.py            # check + config sweep + timings (~3 min, H100)
    PYTHONPATH=. python bench/batch_kernels.py --no-sweep
    PYTHONPATH=. python bench/batch_kernels.py --down-variants   # down kernel: masked walk vs compact (~3 min)
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/batch_kernels.py --dry   # CPU smoke run, tiny shapes

Llama-3-8B FFN (H=4096, I=14336), bf16. 1) Every op at B = 1, 2, 4, 8, 16 on fresh random data
against ``countdown.kernels.reference`` (fp32, masks per token), s = 0.7. 2) A few launch
configurations of the batched kernels (``batch_ffn.BatchConfig``) on M-COUNTDOWN fused and
D-COUNTDOWN practical at B = 2 and 16. 3) Per B in 1, 2, 4, 8, 16 and s in 0.5, 0.7, 0.9:
  dense        cuBLAS: F.linear gate, F.linear up, silu*mul, F.linear down  (x [B, H])
  cats         cuBLAS gate, then gather_ffn(dense="gate")
  cats_fused   fused_gather_ffn(dense="gate")
  mcd          cuBLAS up, then gather_ffn(dense="up")                         M-COUNTDOWN
  mcd_fused    fused_gather_ffn(dense="up")
  dideal       cuBLAS gate and up, silu*mul, then sparse_down                  D-COUNTDOWN ideal
  dideal_fused coefficient_ffn
  dprac        predicted_sparse_ffn (predictor score given)                    D-COUNTDOWN practical
Thresholds: per layer, the midpoint quantile s of the method's score over the batch's [B, I]
scores, so every token keeps about 1 - s of its neurons, its own ones. Weights rotate over 8 layer
copies (2.8 GB, beyond the 50 MB L2); each timing is one CUDA graph over the 8 layers, median of
triton's do_bench (L2 flushed before each replay), divided by 8. union = mean fraction of neurons
kept by at least one token (``reference.union_kept_fraction``); bytes = weight bytes the path must
read (dense part + union rows); floor = bytes / 3.0 TB/s; GB/s = bytes / time. Table last; JSON to
$OUT/batch_results.json.

--down-variants: the batched down kernel's variants (``DOWN_VARIANTS``: the masked walk and the
compacting kernel in a few launch configurations), each first checked against the reference at
B = 2, 4, 16 on every path below (a wrong one is not timed), then timed as above on: down (sparse_down
on an fp32 t: the down kernel alone, bytes = union rows), mcd_fused, dprac, dideal_fused, at
B = 2, 4, 8, 16 and s = 0.7, 0.9. Table last (us per layer, % of the byte floor, best variant);
JSON to $OUT/batch_down_variants.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch
import torch.nn.functional as F
import triton

from countdown import kernels
from countdown.kernels import _core, batch_ffn, reference
from ffn_kernels import time_layers  # bench/ffn_kernels.py (this folder)

H, I = 4096, 14336
DEV = "cuda"
DTYPE = torch.bfloat16
LAYERS = 8
BATCHES = (1, 2, 4, 8, 16)
SPARSITIES = (0.5, 0.7, 0.9)
PATHS = ("cats", "cats_fused", "mcd", "mcd_fused", "dideal", "dideal_fused", "dprac")
COPY_BW = 3.0e12
ROW = H * 2  # bytes of one weight row


def log(*a):
    print(*a, flush=True)


def make_layers(seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    layers = []
    for _ in range(LAYERS):
        wg = (torch.randn(I, H, generator=g, device=DEV) / H**0.5).to(DTYPE)
        wu = (torch.randn(I, H, generator=g, device=DEV) / H**0.5).to(DTYPE)
        wd = (torch.randn(H, I, generator=g, device=DEV) / I**0.5).to(DTYPE)
        layers.append(kernels.pack_ffn_weights(wg, wu, wd) + (wd,))
    return layers


def scores(path, x, p, gen):
    """(score [B, I] that decides the mask, the vector the op is given) for one path."""
    g = x.float() @ p[0].float().t()
    u = x.float() @ p[1].float().t()
    base = path.replace("_fused", "")
    if base == "cats":
        return reference.activation(g, "silu").abs(), g
    if base == "mcd":
        return u.abs(), u
    if base == "dideal":
        t = reference.activation(g, "silu") * u
        return t.abs(), t
    s = torch.randn(x.shape[0], I, device=DEV, generator=gen)
    return s, s


def op_call(path, x, p, vec, thr):
    wg, wu, wdt = p[0], p[1], p[2]
    if path == "cats":
        return kernels.gather_ffn(x, F.linear(x, wg), wu, wdt, thr, dense="gate")
    if path == "cats_fused":
        return kernels.fused_gather_ffn(x, wg, wu, wdt, thr, dense="gate")
    if path == "mcd":
        return kernels.gather_ffn(x, F.linear(x, wu), wg, wdt, thr, dense="up")
    if path == "mcd_fused":
        return kernels.fused_gather_ffn(x, wu, wg, wdt, thr, dense="up")
    if path == "dideal":
        return kernels.sparse_down(F.silu(F.linear(x, wg)) * F.linear(x, wu), wdt, thr)
    if path == "dideal_fused":
        return kernels.coefficient_ffn(x, wg, wu, wdt, thr)
    return kernels.predicted_sparse_ffn(x, vec, wg, wu, wdt, thr)


def ref_call(path, x, p, vec, thr):
    wg, wu, wdt = p[0], p[1], p[2]
    base = path.replace("_fused", "")
    if base == "cats":
        return reference.gather_ffn(x, vec, wu, wdt, thr, dense="gate")
    if base == "mcd":
        return reference.gather_ffn(x, vec, wg, wdt, thr, dense="up")
    if base == "dideal":
        return reference.sparse_down(vec, wdt, thr)
    return reference.predicted_sparse_ffn(x, vec, wg, wu, wdt, thr)


def dense_call(x, p):
    return F.linear(F.silu(F.linear(x, p[0])) * F.linear(x, p[1]), p[3])


def bytes_read(path, union):
    base = path.replace("_fused", "")
    dense_rows = {"cats": I, "mcd": I, "dideal": 2 * I, "dprac": 0}[base]
    sparse_rows = {"cats": 2, "mcd": 2, "dideal": 1, "dprac": 3}[base] * union * I
    return (dense_rows + sparse_rows) * ROW


def rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def inputs(path, batch, s, layers, seed):
    """Per layer: x [B, H], the op's vector, the threshold tensor, and the union kept fraction."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    per = []
    for p in layers:
        x = torch.randn(batch, H, device=DEV, generator=gen).to(DTYPE)
        score, vec = scores(path, x, p, gen)
        thr = reference.midpoint_threshold(score, s)
        union = float(reference.union_kept_fraction(score > thr))
        vec = vec.to(DTYPE) if path in ("cats", "mcd") else vec
        per.append((x, vec, torch.tensor([thr], device=DEV), union))
    return per


def check(layers):
    rows = []
    for path in PATHS:
        for batch in BATCHES:
            x, vec, thr, union = inputs(path, batch, 0.7, layers[:1], seed=1000 + batch)[0]
            p = layers[0]
            out = torch.full((batch, H), float("nan"), dtype=DTYPE, device=DEV)
            out.copy_(op_call(path, x, p, vec, thr))
            # paths fed by cuBLAS get its bf16 vector: the reference is fed the same one
            if path in ("cats", "mcd"):
                vec = F.linear(x, p[0] if path == "cats" else p[1])
            elif path == "dideal":
                vec = F.silu(F.linear(x, p[0])) * F.linear(x, p[1])
            err = rel_err(out, ref_call(path, x, p, vec, thr))
            rows.append(dict(path=path, batch=batch, rel_err=err, ok=err <= 1e-2, union=union))
            log(f"check {path:13s} B={batch:2d} rel_err={err:.2e} union={union:.3f} {'ok' if err <= 1e-2 else 'FAIL'}")
    return rows


SWEEP = {
    "base": {},
    "bi32": dict(block_i=32),
    "bi128_w8": dict(block_i=128, coef_warps=8),
    "bk256": dict(block_k=256),
    "st4": dict(stages=4),
    "st2": dict(stages=2),
    "ht128": dict(h_tile=128),
    "ht512_w8": dict(h_tile=512, down_warps=8),
    "dp132": dict(down_programs=132),
    "dp528": dict(down_programs=528),
    "bn32": dict(block_n=32),
    "bn128": dict(block_n=128),
}


def sweep(layers):
    rows = []
    for path, kind, compute in (("mcd_fused", _core.KIND_UP, True), ("dprac", _core.KIND_SCORE, False)):
        for batch, s in ((2, 0.9), (16, 0.5)):
            per = inputs(path, batch, s, layers, seed=77)
            for name, kw in SWEEP.items():
                cfg = dataclasses.replace(batch_ffn.GPU_CONFIG, **kw)

                def fn(l, cfg=cfg):
                    x, vec, thr, _ = per[l]
                    p = layers[l]
                    return batch_ffn.launch(kind, compute, x, None if compute else vec, p[0], p[1], p[2], thr, 0.0,
                                            "silu", False, config=cfg)
                try:
                    us = time_layers(fn, layers=LAYERS)
                except Exception as e:  # a configuration that does not compile (resources) is reported
                    log(f"sweep {path} B={batch} s={s} {name}: {type(e).__name__} {str(e)[:120]}")
                    continue
                rows.append(dict(path=path, batch=batch, s=s, config=name, us=us))
                log(f"sweep {path:10s} B={batch:2d} s={s} {name:9s} {us:7.1f} us")
    return rows


# --down-variants: the masked-walk down kernel (base) against the compacting one
# (``BatchConfig.compact``). Chosen from the sm_90 compile of triton 3.6 (registers, shared memory):
# c64 keeps base's grid (16 x 16 programs, 2 per SM at ~220 registers); the dp396 ones fill 3 CTAs
# per SM in one wave; c32_ht128_dp640 runs many small programs (5 per SM, ~85 registers).
DOWN_VARIANTS = {
    "base": {},
    "c64": dict(compact=True),
    "c32_dp396": dict(compact=True, block_n=32, down_programs=396),
    "c64_ht128_dp396": dict(compact=True, h_tile=128, down_programs=396),
    "c32_ht128_dp640": dict(compact=True, block_n=32, h_tile=128, down_programs=640),
}
# path -> (kind, compute); "down" is ``sparse_down`` on an fp32 t [B, I]: the down kernel alone
DOWN_PATHS = {"down": (_core.KIND_T, False), "mcd_fused": (_core.KIND_UP, True),
              "dprac": (_core.KIND_SCORE, False), "dideal_fused": (_core.KIND_T, True)}
DOWN_BATCHES = (2, 4, 8, 16)
DOWN_SPARSITIES = (0.7, 0.9)


def variant_call(path, cfg, x, vec, p, thr):
    kind, compute = DOWN_PATHS[path]
    return batch_ffn.launch(kind, compute, None if path == "down" else x, None if compute else vec, p[0], p[1], p[2],
                            thr, 0.0, "silu", False, config=cfg)


def variant_inputs(path, batch, s, layers, seed):
    return inputs("dideal" if path == "down" else path, batch, s, layers, seed)


def variant_bytes(path, union):
    return union * I * ROW if path == "down" else bytes_read(path, union)


def down_variants(layers, batches, sparsities, check_batches):
    """Check every variant against the reference, then time the correct ones; returns the results dict."""
    cfgs = {name: dataclasses.replace(batch_ffn.GPU_CONFIG, **kw) for name, kw in DOWN_VARIANTS.items()}
    checks, bad = [], set()
    for name, cfg in cfgs.items():
        for path in DOWN_PATHS:
            for batch in check_batches:
                x, vec, thr, union = variant_inputs(path, batch, 0.8, layers[:1], seed=500 + batch)[0]
                p = layers[0]
                try:
                    out = variant_call(path, cfg, x, vec, p, thr)
                    ref = reference.sparse_down(vec, p[2], thr) if path == "down" else ref_call(path, x, p, vec, thr)
                    err = rel_err(out, ref)
                except Exception as e:  # a variant that does not compile (resources) is reported, not timed
                    log(f"check {name} {path} B={batch}: {type(e).__name__} {str(e)[:160]}")
                    err = float("inf")
                ok = err <= 1e-2
                if not ok:
                    bad.add(name)
                checks.append(dict(variant=name, path=path, batch=batch, rel_err=err, ok=ok, union=union))
                log(f"check {name:16s} {path:12s} B={batch:2d} rel_err={err:.2e} union={union:.3f} "
                    f"{'ok' if ok else 'FAIL'}")
    timings = []
    for path in DOWN_PATHS:
        for batch in batches:
            for s in sparsities:
                per = variant_inputs(path, batch, s, layers, seed=batch * 10 + int(s * 100))
                union = sum(q[3] for q in per) / len(per)
                cell = []
                for name, cfg in cfgs.items():
                    if name in bad:
                        continue

                    def fn(l, per=per, path=path, cfg=cfg):
                        x, vec, thr, _ = per[l]
                        return variant_call(path, cfg, x, vec, layers[l], thr)

                    us = time_layers(fn, layers=LAYERS)
                    cell.append(dict(variant=name, path=path, batch=batch, s=s, us=us, union=union,
                                     bytes=variant_bytes(path, union)))
                timings += cell
                log(f"timed {path:12s} B={batch:2d} s={s} union={union:.3f}: " +
                    " ".join(f"{r['variant']}={r['us']:.1f}" for r in cell))
    return dict(variants={n: dataclasses.asdict(c) for n, c in cfgs.items()}, check=checks, failed=sorted(bad),
                timings=timings)


def print_down_table(res):
    fails = [r for r in res["check"] if not r["ok"]]
    log(f"\ncheck: {len(res['check']) - len(fails)}/{len(res['check'])} ok" +
        (f"; not timed (wrong or failed): {res['failed']}" if fails else ""))
    names = [n for n in res["variants"] if n not in res["failed"]]
    log("us per layer (% of the byte floor at 3.0 TB/s); union = rows kept by some token; best = fastest")
    for path in DOWN_PATHS:
        for s in DOWN_SPARSITIES:
            rows = [r for r in res["timings"] if r["path"] == path and r["s"] == s]
            if not rows:
                continue
            log(f"{path + ' s=' + str(s):17s}" + "".join(f"{n:>18s}" for n in names) + "  best (vs base)")
            for batch in sorted({r["batch"] for r in rows}):
                cell = {r["variant"]: r for r in rows if r["batch"] == batch}
                floor = next(iter(cell.values()))["bytes"] / COPY_BW * 1e6
                txt = "".join(f"{cell[n]['us']:10.1f} ({100 * floor / cell[n]['us']:3.0f}%)" for n in names)
                best = min(cell.values(), key=lambda r: r["us"])
                vs = f" {cell['base']['us'] / best['us']:.2f}x" if "base" in cell else ""
                log(f"  B={batch:2d} u={cell[names[0]]['union']:.2f}{txt}  {best['variant']}{vs}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--down-variants", action="store_true",
                    help="only the down-kernel variants (masked walk vs compact): check, time, table")
    args = ap.parse_args()
    if args.dry:
        global H, I, DEV, LAYERS, ROW, SWEEP
        H, I, DEV, LAYERS = 40, 136, "cpu", 2
        ROW = H * 2
        SWEEP = {k: SWEEP[k] for k in ("base", "bi32")}
        batch_ffn.GPU_CONFIG = batch_ffn._INTERPRET_CONFIG
    t0 = time.time()
    device_name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)"
    log(device_name, torch.__version__, triton.__version__)
    layers = make_layers()
    if args.down_variants:
        small = args.dry  # the interpreter: two batch sizes, one sparsity
        res = down_variants(layers, (2, 4) if small else DOWN_BATCHES, (0.9,) if small else DOWN_SPARSITIES,
                            (2, 16) if small else (2, 4, 16))
        res.update(device=device_name, torch=torch.__version__, triton=triton.__version__, seconds=time.time() - t0)
        out = os.environ.get("OUT")
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "batch_down_variants.json"), "w") as f:
                json.dump(res, f, indent=1)
        print_down_table(res)
        log(f"total {time.time() - t0:.0f}s")
        return
    results = dict(device=device_name, torch=torch.__version__, triton=triton.__version__,
                   config=dataclasses.asdict(batch_ffn.GPU_CONFIG))
    results["check"] = check(layers)
    log(f"check done {time.time() - t0:.0f}s")
    if not args.no_sweep:
        results["sweep"] = sweep(layers)
        log(f"sweep done {time.time() - t0:.0f}s")
    timings = []
    for batch in BATCHES:
        xs = [torch.randn(batch, H, device=DEV).to(DTYPE) for _ in range(LAYERS)]
        dense_us = time_layers(lambda l: dense_call(xs[l], layers[l]), layers=LAYERS)
        timings.append(dict(path="dense", batch=batch, s=0.0, us=dense_us, union=1.0, bytes=3 * I * ROW))
        for s in SPARSITIES:
            for path in PATHS:
                per = inputs(path, batch, s, layers, seed=batch * 10 + int(s * 100))

                def fn(l, per=per, path=path):
                    x, vec, thr, _ = per[l]
                    return op_call(path, x, layers[l], vec, thr)

                us = time_layers(fn, layers=LAYERS)
                union = sum(q[3] for q in per) / LAYERS
                timings.append(dict(path=path, batch=batch, s=s, us=us, union=union, bytes=bytes_read(path, union),
                                    speedup=dense_us / us))
        log(f"timed B={batch} {time.time() - t0:.0f}s")
    results["timings"] = timings
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "batch_results.json"), "w") as f:
            json.dump(results, f, indent=1)

    # ---- table (last) ----
    fails = [r for r in results["check"] if not r["ok"]]
    log(f"\ncheck: {len(results['check']) - len(fails)}/{len(results['check'])} ok, worst rel_err "
        f"{max(r['rel_err'] for r in results['check']):.2e}" + (f"; FAIL: {fails}" if fails else ""))
    if "sweep" in results:
        log("sweep (us per layer):")
        keys = sorted({(r["path"], r["batch"], r["s"]) for r in results["sweep"]})
        for k in keys:
            cells = " ".join(f"{r['config']}={r['us']:.1f}" for r in results["sweep"]
                             if (r["path"], r["batch"], r["s"]) == k)
            log(f"  {k[0]} B={k[1]} s={k[2]}: {cells}")
    dense = {r["batch"]: r["us"] for r in timings if r["path"] == "dense"}
    log("\nus per layer (speed-up vs dense) [union kept, floor us, GB/s]; dense us: " +
        ", ".join(f"B={b}: {us:.1f}" for b, us in dense.items()))
    for s in SPARSITIES:
        log(f"s={s}")
        log("  path          " + "".join(f"B={b:<24d}" for b in BATCHES))
        for path in PATHS:
            cells = []
            for b in BATCHES:
                r = next(r for r in timings if r["path"] == path and r["batch"] == b and r["s"] == s)
                floor_us = r["bytes"] / COPY_BW * 1e6
                cells.append(f"{r['us']:5.1f} ({r['speedup']:.2f}x) [{r['union']:.2f},{floor_us:3.0f},"
                             f"{r['bytes'] / r['us'] / 1e3:4.0f}]")
            log(f"  {path:13s} " + " ".join(f"{c:25s}" for c in cells))
    worst = min(r["speedup"] for r in timings if r["path"] != "dense")
    log(f"min speed-up over all paths/B/s: {worst:.3f}x; total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
