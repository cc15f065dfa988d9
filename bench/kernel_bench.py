"""Decode kernels alone: every method's FFN kernel against dense, at every batch size; input-sparse GEMVs.

    PYTHONPATH=. python bench/kernel_bench.py                          # Llama-3-8B FFN, every method, B 1-16
    PYTHONPATH=. python bench/kernel_bench.py --methods cats,m-countdown --batch 1,4 --sparsities 0.9
    PYTHONPATH=. python bench/kernel_bench.py --shape llama-2-7b --no-gemv
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/kernel_bench.py --device cpu --shape tiny   # CPU smoke run

The path table is `countdown.methods`: a path is a method with a kernel (``has_kernel``), served by its own
``kernel_forward``, the code a decode step runs; ``dense`` is the model's own FFN (cuBLAS). A model of
``--layers`` Llama layers of the shape (random weights, the FFN shape of the real model) is sparsified per
(method, sparsity) with ``countdown.sparsify`` (thresholds calibrated on random tokens; D-COUNTDOWN with
untrained predictors of the paper's size), so every path takes the thresholds, layouts and kernel choices
the library ships. The FFN inputs are each layer's real inputs from a forward of random tokens (the last B
positions), so the thresholds keep about 1 − s of the neurons.

Per (method, s, B): the kernel's output against the method's reference path on the same module (bf16: a
score on either side of its threshold may flip a neuron, so the error is a sanity figure; the exact
comparisons are tests/kernels/), the measured skipped fraction of each site (per token, and of the batch's
union: the rows a batch reads), µs per layer (the ``--layers`` layers in one CUDA graph, do_bench median,
each layer its own weights, beyond L2), the ratio to dense and the byte floor at ``--bandwidth``
(the method's ``ffn_bytes_read`` of the union). ``--gemv``: `countdown.kernels.input_sparse_linear` on the
attention and FFN projection shapes against ``F.linear``. Tables last; JSON to $OUT/kernel_bench.json.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import bench_graph, environment, log, rel_err, save_json

import countdown
from countdown import ffn
from countdown.kernels import reference
from countdown.loading import RANDOM_SHAPES
from countdown.methods import METHODS
from countdown.predictor import random_predictors

TINY = dict(hidden_size=64, intermediate_size=136, num_attention_heads=4, num_key_value_heads=2)


def build_model(shape: str, layers: int, device: str, dtype: torch.dtype):
    """``layers`` Llama layers of the shape's widths (a small vocabulary: only the FFNs are timed)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    widths = TINY if shape == "tiny" else {k: RANDOM_SHAPES[shape][k] for k in
                                           ("hidden_size", "intermediate_size", "num_attention_heads",
                                            "num_key_value_heads")}
    config = LlamaConfig(**widths, num_hidden_layers=layers, vocab_size=512, max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


@torch.no_grad()
def ffn_inputs(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's FFN input [T, H] on a forward of ``tokens`` [1, T]."""
    seen: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0].clone()))
             for layer in model.model.layers]
    try:
        model(input_ids=tokens.to(model.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def kernel_methods(names: str) -> list[str]:
    with_kernel = [name for name, m in METHODS.items() if m.has_kernel]
    if names == "all":
        return with_kernel
    chosen = names.split(",")
    bad = [n for n in chosen if n not in with_kernel]
    if bad:
        raise SystemExit(f"no kernel for {bad}; methods with a kernel: {', '.join(with_kernel)}")
    return chosen


def recording_keep(module, masks: dict[str, torch.Tensor]):
    """The module's own mask rule, keeping each site's [B, I] mask for the union count."""
    def keep(site: str, score: torch.Tensor) -> torch.Tensor:
        mask = module.keep(site, score)
        masks[site] = mask.reshape(-1, mask.shape[-1]).bool()
        return mask
    return keep


@torch.no_grad()
def bench_method(model, name: str, s: float, batches: list[int], xs: list[torch.Tensor], calib: torch.Tensor,
                 dense_us: dict[int, float], ffn_bytes: int, bandwidth: float) -> list[dict]:
    method = METHODS[name]
    preds = random_predictors(model) if method.needs_predictor else None
    countdown.sparsify(model, name, s, calibration=calib, predictors=preds, max_windows=None, progress=False,
                       kernels="always")
    try:
        modules = ffn.sparse_modules(model)
        rows = []
        for batch in batches:
            xb = [x[-batch:] for x in xs]
            reason = modules[0].kernel_skip_reason(xb[0])
            if reason is not None:
                log(f"{name} s={s} B={batch}: not timed, {reason}")
                continue
            m0, masks = modules[0], {}
            ref = m0.method.forward(m0, xb[0], recording_keep(m0, masks))
            err = rel_err(m0.method.kernel_forward(m0, xb[0]), ref)
            token_skipped = {site: 1 - float(mask.float().mean()) for site, mask in masks.items()}
            union_skipped = {site: 1 - float(mask.any(0).float().mean()) for site, mask in masks.items()}
            frac = method.ffn_bytes_read(m0.kind, union_skipped)
            us = bench_graph(lambda i: modules[i].method.kernel_forward(modules[i], xb[i]), len(modules))
            floor_us = ffn_bytes * frac / bandwidth * 1e6
            rows.append(dict(method=name, s=s, batch=batch, us=us, dense_us=dense_us[batch],
                             ratio=dense_us[batch] / us, bytes_fraction=frac, floor_us=floor_us,
                             pct_floor=floor_us / us, rel_err=err, ok=err < 0.1,
                             skipped_per_token=token_skipped, skipped_union=union_skipped))
            log(f"{name} s={s} B={batch}: {us:.1f} µs (dense {dense_us[batch]:.1f}), rel err {err:.1e}")
        return rows
    finally:
        countdown.unsparsify(model)


GEMV_SHAPES = {"o_proj": ("hidden", "hidden"), "k/v": ("hidden", "kv"), "qkv": ("hidden", "qkv"),
               "gate/up": ("hidden", "inter"), "down": ("inter", "hidden")}


@torch.no_grad()
def bench_gemv(config, batches: list[int], sparsities: list[float], copies: int, device: str, dtype,
               bandwidth: float) -> list[dict]:
    """`input_sparse_linear` (TEAL / WINA / attention inputs) against F.linear per projection shape."""
    from countdown import kernels

    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    width = {"hidden": config.hidden_size, "inter": config.intermediate_size, "kv": kv,
             "qkv": config.hidden_size + 2 * kv}
    g = torch.Generator(device=device).manual_seed(1)
    rows = []
    for shape, (k_name, n_name) in GEMV_SHAPES.items():
        k, n = width[k_name], width[n_name]
        ws = [(torch.randn(n, k, device=device, generator=g) / k**0.5).to(dtype) for _ in range(copies)]
        ws_t = [w.t().contiguous() for w in ws]
        for batch in batches:
            x = torch.randn(batch, k, device=device, generator=g).to(dtype)
            dense = bench_graph(lambda c: F.linear(x, ws[c]), copies)
            for s in sparsities:
                thr = reference.midpoint_threshold(x.abs(), s)
                kept = float((x.float().abs() > thr).any(0).float().mean())
                err = rel_err(kernels.input_sparse_linear(x, ws_t[0], thr),
                              reference.input_sparse_linear(x.float(), ws_t[0].float(), thr))
                us = bench_graph(lambda c: kernels.input_sparse_linear(x, ws_t[c], thr), copies)
                floor_us = kept * k * n * ws[0].element_size() / bandwidth * 1e6
                rows.append(dict(shape=f"{shape} {k}→{n}", batch=batch, s=s, us=us, dense_us=dense, floor_us=floor_us,
                                 pct_floor=floor_us / us, rel_err=err, ok=err < 1e-2))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama-3-8b", choices=[*sorted(RANDOM_SHAPES), "tiny"])
    ap.add_argument("--methods", default="all", help="comma-separated methods with a kernel, or all")
    ap.add_argument("--batch", default="1,2,4,8,16", help="decode batch sizes (tokens per step), 1-16")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--layers", type=int, default=8, help="layers timed in one graph (8 × 470 MB beyond L2 for 8B)")
    ap.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s of the byte floor (H100: 3.0e12)")
    ap.add_argument("--gemv", action=argparse.BooleanOptionalAction, default=True,
                    help="also time input_sparse_linear per projection shape")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    methods = kernel_methods(args.methods)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; for a smoke run: TRITON_INTERPRET=1 ... --device cpu --shape tiny")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    t0 = time.time()
    info = {**environment(), "shape": args.shape, "layers": args.layers, "dtype": str(dtype),
            "bandwidth": args.bandwidth, "methods": methods, "batches": batches, "sparsities": sparsities}
    log(info)
    model = build_model(args.shape, args.layers, args.device, dtype)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(model.config.vocab_size, (4, 64), generator=g)
    xs = ffn_inputs(model, torch.randint(model.config.vocab_size, (1, max(batches)), generator=g))
    mlps = [layer.mlp for layer in model.model.layers]
    ffn_bytes = sum(p.numel() * p.element_size() for p in mlps[0].parameters())
    dense_us = {b: bench_graph(lambda i, b=b: mlps[i](xs[i][-b:]), len(mlps)) for b in batches}
    rows = []
    for name in methods:
        for s in sparsities:
            rows += bench_method(model, name, s, batches, xs, calib, dense_us, ffn_bytes, args.bandwidth)
            save_json("kernel_bench.json", {**info, "dense_us": dense_us, "ffn": rows})
    gemv = bench_gemv(model.config, batches, [0.0, *sparsities], args.layers, args.device, dtype,
                      args.bandwidth) if args.gemv else []
    save_json("kernel_bench.json", {**info, "dense_us": dense_us, "ffn": rows, "gemv": gemv})

    print(f"\nFFN of {args.shape} ({model.config.hidden_size} → {model.config.intermediate_size}), {dtype}, "
          f"{info['device']}, {args.layers} layers per graph, µs per layer, floor at {args.bandwidth / 1e12:.1f} TB/s, "
          f"{time.time() - t0:.0f}s")
    print("| method | s | B | µs | dense µs | vs dense | skipped (token / union) | bytes vs dense | % of floor | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        site = METHODS[r["method"]].reported_site
        tok, uni = r["skipped_per_token"].get(site, float("nan")), r["skipped_union"].get(site, float("nan"))
        print(f"| {r['method']} | {r['s']} | {r['batch']} | {r['us']:.1f} | {r['dense_us']:.1f} | {r['ratio']:.2f}× | "
              f"{tok:.2f} / {uni:.2f} | {r['bytes_fraction']:.2f} | {r['pct_floor']:.0%} | "
              f"{r['rel_err']:.1e}{'' if r['ok'] else ' FAIL'} |")
    if gemv:
        print("\ninput_sparse_linear against F.linear, µs per call")
        print("| shape | B | s | µs | F.linear µs | % of floor | rel err |")
        print("|---|---|---|---|---|---|---|")
        for r in gemv:
            print(f"| {r['shape']} | {r['batch']} | {r['s']} | {r['us']:.1f} | {r['dense_us']:.1f} | "
                  f"{r['pct_floor']:.0%} | {r['rel_err']:.1e}{'' if r['ok'] else ' FAIL'} |")
    failed = [r for r in rows + gemv if not r["ok"]]
    if failed:
        raise SystemExit(f"{len(failed)} rows failed their check (see the tables)")


if __name__ == "__main__":
    main()
