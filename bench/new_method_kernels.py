"""DejaVu, CHESS, S-COUNTDOWN and WINA kernels against their scalar twins: check, time, table.

    PYTHONPATH=. python bench/new_method_kernels.py          # ~3 min on an H100
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/new_method_kernels.py --dry   # CPU smoke run, tiny shapes

Llama-3-8B FFN (H=4096, I=14336), bf16, 8 rotating layer copies (beyond L2), one CUDA graph over the
layers, median of do_bench (bench/ffn_kernels.time_layers). Each new method runs an existing op with a
per-neuron threshold vector (CHESS, S-COUNTDOWN), a signed score (DejaVu) or a channel scale (WINA);
its twin is the same op as shipped before (CATS fused, D-COUNTDOWN ideal fused, TEAL):

    chess     fused_gather_ffn, thr_i = τ / m_i (m_i: random per-neuron E|u_i| in [0.5, 1.5))   twin cats
    dejavu    fused_gather_ffn(score_act=False, signed=True), τ on g                          twin cats
    scd       coefficient_ffn, thr_i = sqrt(2τ) / ‖W_down[:, i]‖                              twin dideal
    wina      input_sparse_linear x3 with channel_scale (column norms), act·mul                twin teal

Thresholds: per layer, the midpoint s-quantile of the method's own score over the batch, so each token
keeps about 1 - s of its neurons (the twin gets its own score's quantile: same bytes). Both members of
a pair read the same weight bytes; the new one reads I (or 2H + I) more fp32 values. Expected: within
noise of the twin. The table (last) gives µs per layer and new/twin; JSON to $OUT/new_method_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
import triton

from countdown import kernels
from countdown.kernels import reference
from ffn_kernels import time_layers  # bench/ffn_kernels.py (this folder)

H, I = 4096, 14336
DEV = "cuda"
DTYPE = torch.bfloat16
LAYERS = 8
BATCHES = (1, 2, 4, 16)
SPARSITIES = (0.5, 0.9)
PAIRS = (("chess", "cats"), ("dejavu", "cats"), ("scd", "dideal"), ("wina", "teal"))


def log(*a):
    print(*a, flush=True)


def make_layers(seed=0):
    """Per layer: packed weights, W_gate^T and W_up^T (input-major, for TEAL/WINA), the column norms of
    W_gate ([H]) and W_down ([I]) and a random positive per-neuron statistic m ([I], CHESS's E|u_i|)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    layers = []
    for _ in range(LAYERS):
        wg = (torch.randn(I, H, generator=g, device=DEV) / H**0.5).to(DTYPE)
        wu = (torch.randn(I, H, generator=g, device=DEV) / H**0.5).to(DTYPE)
        wd = (torch.randn(H, I, generator=g, device=DEV) / I**0.5).to(DTYPE)
        p = kernels.pack_ffn_weights(wg, wu, wd)
        layers.append(dict(p=p, wg_t=wg.t().contiguous(), wu_t=wu.t().contiguous(),
                           norm_g=torch.linalg.vector_norm(wg, dim=0, dtype=torch.float32),
                           norm_d=torch.linalg.vector_norm(wd, dim=0, dtype=torch.float32),
                           m=torch.rand(I, generator=g, device=DEV) + 0.5))
        del wd
    return layers


def _mid(score, s):
    return reference.midpoint_threshold(score, s)


def setup(path, x, L, s):
    """(threshold(s) for the op, kept fraction) for one path on tokens x [B, H]."""
    p = L["p"]
    g = x.float() @ p.w_gate.float().t()
    u = x.float() @ p.w_up.float().t()
    t = reference.activation(g, "silu") * u
    if path == "cats":
        thr = _mid(reference.activation(g, "silu").abs(), s)
        return torch.tensor([thr], device=DEV)
    if path == "chess":
        tau = _mid(reference.activation(g, "silu").abs() * L["m"], s)
        return (tau / L["m"]).contiguous()
    if path == "dejavu":
        return torch.tensor([_mid(g, s)], device=DEV)
    if path == "dideal":
        return torch.tensor([_mid(t.abs(), s)], device=DEV)
    if path == "scd":
        tau = _mid(0.5 * t.square() * L["norm_d"].square(), s)
        return (torch.tensor(2 * tau, device=DEV, dtype=torch.float64).sqrt() / L["norm_d"].double()).float()
    if path == "teal":
        xm = torch.where(x.float().abs() > _mid(x.float().abs(), s), x.float(), 0.0)
        tt = reference.activation(xm @ p.w_gate.float().t(), "silu") * (xm @ p.w_up.float().t())
        return _mid(x.float().abs(), s), _mid(tt.abs(), s)
    xs = x.float().abs() * L["norm_g"]
    xm = torch.where(xs > _mid(xs, s), x.float(), 0.0)
    tt = reference.activation(xm @ p.w_gate.float().t(), "silu") * (xm @ p.w_up.float().t())
    return _mid(xs, s), _mid(tt.abs() * L["norm_d"], s)


def op_call(path, x, L, thr, lib=kernels, gemvs=None):
    """The path's FFN output through ``lib`` (kernels or reference). TEAL / WINA: with ``gemvs`` a list,
    each input-sparse GEMV's (x, w_t, thr, scale) is appended, so that the check can feed the reference
    the kernel's own intermediate t (a bf16 rounding of t flips channels at its threshold)."""
    p = L["p"]
    if path in ("cats", "chess"):
        return lib.fused_gather_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr, dense="gate")
    if path == "dejavu":
        return lib.fused_gather_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr, dense="gate", score_act=False, signed=True)
    if path in ("dideal", "scd"):
        return lib.coefficient_ffn(x, p.w_gate, p.w_up, p.w_down_t, thr)
    thr_in, thr_coef = thr
    sg, sd = (L["norm_g"], L["norm_d"]) if path == "wina" else (None, None)

    def gemv(v, w_t, t, scale):
        if gemvs is not None:
            gemvs.append((v, w_t, t, scale))
        return lib.input_sparse_linear(v, w_t, t, channel_scale=scale)

    gate = gemv(x, L["wg_t"], thr_in, sg)
    up = gemv(x, L["wu_t"], thr_in, sg)
    return gemv(F.silu(gate) * up, p.w_down_t, thr_coef, sd)


def check_error(path, x, L, thr):
    """Relative error of the path's kernel output against the reference (per GEMV for TEAL / WINA)."""
    if path not in ("teal", "wina"):
        return rel_err(op_call(path, x, L, thr), op_call(path, x, L, thr, lib=reference))
    gemvs = []
    op_call(path, x, L, thr, gemvs=gemvs)
    return max(rel_err(kernels.input_sparse_linear(v, w_t, t, channel_scale=sc),
                       reference.input_sparse_linear(v, w_t, t, channel_scale=sc)) for v, w_t, t, sc in gemvs)


def rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    global H, I, DEV, LAYERS, BATCHES, SPARSITIES
    if args.dry:
        H, I, DEV, LAYERS, BATCHES, SPARSITIES = 40, 136, "cpu", 2, (1, 3), (0.7,)
    t0 = time.time()
    device_name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)"
    log(device_name, torch.__version__, triton.__version__)
    layers = make_layers()
    paths = [q for pair in PAIRS for q in pair]
    checks, timings = [], []
    gen = torch.Generator(device=DEV).manual_seed(1)
    for path in dict.fromkeys(paths):
        for batch in (1, 4):
            x = torch.randn(batch, H, device=DEV, generator=gen).to(DTYPE)
            thr = setup(path, x, layers[0], 0.7)
            err = check_error(path, x, layers[0], thr)
            checks.append(dict(path=path, batch=batch, rel_err=err, ok=err <= 1e-2))
            log(f"check {path:7s} B={batch:2d} rel_err={err:.2e} {'ok' if err <= 1e-2 else 'FAIL'}")
    for batch in BATCHES:
        for s in SPARSITIES:
            xs = [torch.randn(batch, H, device=DEV, generator=gen).to(DTYPE) for _ in range(LAYERS)]
            for path in dict.fromkeys(paths):
                thrs = [setup(path, xs[l], layers[l], s) for l in range(LAYERS)]
                us = time_layers(lambda l, path=path, thrs=thrs: op_call(path, xs[l], layers[l], thrs[l]),
                                 layers=LAYERS)
                timings.append(dict(path=path, batch=batch, s=s, us=us))
            log(f"timed B={batch} s={s} {time.time() - t0:.0f}s")
    results = dict(device=device_name, torch=torch.__version__, triton=triton.__version__, check=checks,
                   timings=timings)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "new_method_kernels.json"), "w") as f:
            json.dump(results, f, indent=1)

    fails = [c for c in checks if not c["ok"]]
    log(f"\ncheck: {len(checks) - len(fails)}/{len(checks)} ok, worst rel_err "
        f"{max(c['rel_err'] for c in checks):.2e}" + (f"; FAIL: {fails}" if fails else ""))
    us = {(r["path"], r["batch"], r["s"]): r["us"] for r in timings}
    log("us per layer: new / twin (ratio)")
    log("| pair | s | " + " | ".join(f"B={b}" for b in BATCHES) + " |")
    for new, twin in PAIRS:
        for s in SPARSITIES:
            cells = [f"{us[new, b, s]:.1f} / {us[twin, b, s]:.1f} ({us[new, b, s] / us[twin, b, s]:.3f})"
                     for b in BATCHES]
            log(f"| {new} vs {twin} | {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
