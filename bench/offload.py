"""Offloaded decode speed (issue 27): a model twice the GPU budget, batch 1, greedy, one process.

Configurations, each in its own try/except (an error is printed and the next one runs):

  (b) dense streaming: the dense model through `countdown.offload` (host rows moved whole every step)
  (c) D-COUNTDOWN 90% (untrained random predictors of the paper's size: speed depends on how many
      neurons pass, not which), M-COUNTDOWN 70%, CATS 50%, thresholds calibrated on random tokens;
      each with the hot-neuron cache (resident set from keep frequencies on random tokens) and without
  (c') D-COUNTDOWN 90% with lookahead predictors (`use_lookahead`; same untrained predictors, fed from
      the attention input or the previous layer's FFN input), with the cache: "look-attention" inline
      (the rows still wait for the FFN), then ``overlap=True`` for both sources (host rows gathered by a
      worker and copied on a side stream from the predictor's input on; `countdown.overlap`)
  (a) accelerate's offload (``dispatch_model`` with ``infer_auto_device_map(max_memory=...)``), last

Each line: decode tok/s, bytes over the link per token, hit rate, the link byte floor (link bytes ÷
measured pinned host-to-device bandwidth + resident bytes read ÷ measured device copy bandwidth) and
the % of it reached; peak device memory during decode. Random weights have no hot neurons: the hit
rate of the random-weight run is whatever random tokens give; ``--hit-rates`` (measured on real models,
scripts/study/offload_study.py) projects each sparse configuration's link bytes and floor at that hit rate —
a projection, marked as such. JSON to ``$OUT/offload.json`` (or --out), the table printed last.

    python bench/offload.py --device cuda --shape llama-3-8b --budget 8GiB --deadline 450
    python bench/offload.py --device cpu --shape tiny      # the same code end to end in seconds
    python bench/offload.py --device cuda --skip m-countdown,cats,nocache,accelerate   # D-COUNTDOWN and overlap only
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch

import countdown
from countdown.hot import keep_frequencies
from countdown.lookahead import remove_lookahead, use_lookahead
from countdown.loading import RANDOM_SHAPES, random_model, resolve_dtype
from countdown.offload import offload, offload_state, parse_bytes, plan_resident, unoffload
from countdown.predictor import random_predictors

TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=512)
SPARSE = (("d-countdown", 0.9), ("m-countdown", 0.7), ("cats", 0.5))


def build(shape: str, device: str, dtype: torch.dtype):
    if shape == "tiny":
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(LlamaConfig(**TINY), dtype=dtype).to(device).eval()
    return random_model(shape, device, dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def link_bandwidth(device: torch.device, nbytes: int) -> dict:
    """Pinned host-to-device copy and device-to-device copy bandwidth (bytes/s), median of 5."""
    pin = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev2 = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def timed(fn) -> float:
        times = []
        for _ in range(6):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return sorted(times[1:])[2]

    h2d = timed(lambda: dev.copy_(host, non_blocking=pin))
    d2d = timed(lambda: dev2.copy_(dev))
    # a copy reads and writes every byte: device read bandwidth ~ 2 bytes / copy time
    return {"h2d": nbytes / h2d, "device_read": 2 * nbytes / d2d, "bytes": nbytes, "pinned": pin}


@torch.no_grad()
def decode(model, prompt: torch.Tensor, new_tokens: int, device: torch.device, warmup: int = 2) -> dict:
    """Greedy decode with a DynamicCache; seconds per token over the steps after ``warmup``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=prompt.to(device), past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    state = offload_state(model)
    times = []
    for step in range(warmup + new_tokens):
        if step == warmup and state is not None:
            state.reset_stats()
        if step == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"s_per_token": sum(times) / len(times), "tokens": len(times), "peak_device_bytes": peak}


def resident_read_bytes(model, state, stats, tokens: int) -> float:
    """Device bytes one token reads: non-FFN weights but the embedding rows, each layer's dense matrix,
    the kept resident rows (dense streaming: all resident rows), and the predictors."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    plan_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.device == state.device)
    if head is not emb and emb.device == state.device:  # a token reads one row of the input embedding
        plan_bytes -= emb.numel() * emb.element_size()
    dense = sum(layer.dense.numel() * layer.dense.element_size() for layer in state.layers if layer.dense is not None)
    row = state.layers[0].row_bytes
    if state.route == "dense":
        hot = sum(layer.hot_ids.numel() for layer in state.layers) * row
    else:
        hot = stats.kept_resident / max(tokens, 1) * row
    predictors = sum(b.numel() * b.element_size() for m in state.ffn_modules for n, b in m.named_buffers()
                     if n.startswith("predictor_"))
    return plan_bytes + dense + hot + predictors


def run_offloaded(model, label, args, device, bw, prompt, calib, cache=True, overlap=False) -> dict:
    freqs = keep_frequencies(model, calib) if cache and countdown.is_sparsified(model) else None
    plan = plan_resident(model, reserve=args.reserve, block_rows=args.block_rows, overlap=overlap)
    t0 = time.perf_counter()
    offload(model, device, args.budget, frequencies=freqs, reserve=args.reserve, block_rows=args.block_rows,
            cache=cache, overlap=overlap)
    setup = time.perf_counter() - t0
    state = offload_state(model)
    try:
        allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        timing = decode(model, prompt, args.new_tokens, device)
        stats = state.stats()
        tokens = timing["tokens"]
        link = stats.bytes_moved / tokens
        resident = resident_read_bytes(model, state, stats, tokens)
        floor = link / bw["h2d"] + resident / bw["device_read"]
        row = {"config": label, "tok_s": 1 / timing["s_per_token"], "link_bytes_per_token": link,
               "resident_read_bytes_per_token": resident, "floor_s": floor,
               "pct_of_floor": 100 * floor / timing["s_per_token"], "hit_rate": stats.hit_rate,
               "kept_per_token_layer": stats.kept / max(stats.tokens, 1), "hot_neurons": state.hot_neurons,
               "host_rows": plan["host_rows"], "resident_minimum": plan["minimum"], "setup_s": setup,
               "rows_moved_per_token": stats.rows_moved / tokens, "rows_prefetched_per_token": stats.rows_prefetched / tokens,
               "overlap": state.overlap_note,
               "device_allocated_after_offload": allocated, **timing}
        if cache and label.split()[0] in args.hit_rates and stats.kept:
            h = args.hit_rates[label.split()[0]]
            kept_rows = stats.kept / tokens  # kept neurons per token, all layers
            row_bytes = state.layers[0].row_bytes
            cold = kept_rows * (1 - h) * row_bytes
            hot_now = stats.kept_resident / tokens * row_bytes
            resident_h = resident - hot_now + kept_rows * h * row_bytes
            row["projected"] = {"hit_rate": h, "link_bytes_per_token": cold,
                                "floor_s": cold / bw["h2d"] + resident_h / bw["device_read"],
                                "note": "projection: this run's kept neurons per token at a real-model hit rate"}
        return row
    finally:
        unoffload(model)


def run_accelerate(model, args, device, prompt) -> dict:
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_submodules

    model.to("cpu")
    max_memory = {device.index or 0: parse_bytes(args.budget) - parse_bytes(args.reserve), "cpu": 2**40}
    if device.type != "cuda":
        raise RuntimeError("accelerate's offload needs a CUDA device")
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=["LlamaDecoderLayer"])
    dispatch_model(model, device_map=device_map)
    try:
        timing = decode(model, prompt, max(2, args.new_tokens // 8), device, warmup=1)
        offloaded = sum(1 for v in device_map.values() if v in ("cpu", "disk"))
        return {"config": "accelerate offload", "tok_s": 1 / timing["s_per_token"], "modules_on_cpu": offloaded,
                **timing}
    finally:
        remove_hook_from_submodules(model)


def lookahead_configs(model, args, device, bw, prompt, calib, predictors, attempt) -> None:
    """(c'): D-COUNTDOWN 90% with the predictor fed from an earlier input, inline and with overlap=True."""
    for source, overlap in (("attention", False), ("attention", True), ("previous", True)):
        label = f"d-countdown 90% look-{source}" + (" +overlap" if overlap else "")

        def one(source=source, overlap=overlap, label=label):
            countdown.sparsify(model, "d-countdown", 0.9, calibration=calib, predictors=predictors, progress=False)
            use_lookahead(model, source)
            try:
                return run_offloaded(model, label, args, device, bw, prompt, calib, cache=True, overlap=overlap)
            finally:
                remove_lookahead(model)
                countdown.unsparsify(model)

        attempt(label, one, need=50)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama-3-8b", choices=["tiny", *RANDOM_SHAPES])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget", default=None, help="GPU budget (default 8GiB; tiny: the resident minimum + 25%% of the rows)")
    ap.add_argument("--reserve", default=None, help="device memory kept for KV cache / activations (default 512MiB; tiny 0)")
    ap.add_argument("--block-rows", type=int, default=None, help="offload's block_rows (default 1024; tiny 16)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--deadline", type=float, default=450, help="seconds; configurations that would start later are skipped")
    ap.add_argument("--hit-rates", default="", help="method=rate,... measured on real models (projection)")
    ap.add_argument("--skip", default="", help="comma-separated configs to skip: "
                    "stream,d-countdown,m-countdown,cats,overlap,nocache,accelerate")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    start = time.perf_counter()
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype)
    args.reserve = args.reserve or ("0" if args.shape == "tiny" else "512MiB")
    args.block_rows = args.block_rows or (16 if args.shape == "tiny" else 1024)
    args.hit_rates = {k: float(v) for k, v in (kv.split("=") for kv in args.hit_rates.split(",") if kv)}
    skip = set(filter(None, args.skip.split(",")))
    rows, errors = [], []
    log = print

    def left() -> float:
        return args.deadline - (time.perf_counter() - start)

    def attempt(name, fn, need: float):
        if left() < need:
            log(f"[skip] {name}: {left():.0f}s left < {need:.0f}s")
            errors.append({"config": name, "error": "skipped (deadline)"})
            return
        t0 = time.perf_counter()
        try:
            row = fn()
            rows.append(row)
            log(f"[done] {name} in {time.perf_counter() - t0:.0f}s: {row.get('tok_s', 0):.2f} tok/s")
        except Exception as err:  # noqa: BLE001 - one configuration's failure must not end the run
            traceback.print_exc()
            errors.append({"config": name, "error": f"{type(err).__name__}: {err}"})
            log(f"[error] {name}: {type(err).__name__}: {err}")

    model = build(args.shape, args.device, dtype)
    log(f"built {args.shape} on {device} in {time.perf_counter() - start:.0f}s")
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(vocab, (1, args.prompt_len), generator=g)
    calib = torch.randint(vocab, (2, 128), generator=g)
    bw = link_bandwidth(device, 256 * 2**20 if device.type == "cuda" else 16 * 2**20)
    log(f"link: pinned host->device {bw['h2d'] / 1e9:.1f} GB/s, device read {bw['device_read'] / 1e9:.0f} GB/s")
    if args.budget is None:
        if args.shape == "tiny":
            # the dense model's minimum with the overlap slots, room for one dense FFN matrix per layer
            # (M-COUNTDOWN's up, CATS's gate) and the predictors, then a quarter of the rows
            plan = plan_resident(model, reserve=args.reserve, block_rows=args.block_rows, overlap=True)
            matrix = plan["row_bytes"] // 3 * plan["host_rows"]
            args.budget = str(plan["minimum"] + matrix * 3 // 2 + plan["host_rows"] * plan["row_bytes"] // 4)
        else:
            args.budget = "8GiB"
    meta = {"shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": args.dtype, "budget": args.budget, "reserve": args.reserve, "block_rows": args.block_rows, "batch": 1,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "bandwidth": bw, "torch": torch.__version__,
            "note": "random weights; D-COUNTDOWN uses untrained predictors of the paper's size; hot sets from keep "
                    "frequencies on random tokens (random weights have no hot neurons)"}

    if "stream" not in skip:
        attempt("dense streaming (b)", lambda: run_offloaded(model, "dense-stream (b)", args, device, bw, prompt, calib),
                need=30)
    predictors = random_predictors(model)
    for cache in (True, False):
        if not cache and "overlap" not in skip:
            lookahead_configs(model, args, device, bw, prompt, calib, predictors, attempt)
        if not cache and "nocache" in skip:
            continue
        for method, s in SPARSE:
            if method in skip:
                continue
            label = f"{method} {s:.0%}" + ("" if cache else " no-cache")

            def one(method=method, s=s, label=label, cache=cache):
                kwargs = {"predictors": predictors} if method == "d-countdown" else {}
                countdown.sparsify(model, method, s, calibration=calib, progress=False, **kwargs)
                try:
                    return run_offloaded(model, label, args, device, bw, prompt, calib, cache=cache)
                finally:
                    countdown.unsparsify(model)

            attempt(label, one, need=50 if cache else 100)  # no-cache runs leave room for accelerate
    if "accelerate" not in skip:
        attempt("accelerate offload (a)", lambda: run_accelerate(model, args, device, prompt), need=20)

    base = next((r for r in rows if r["config"].startswith("dense-stream")), None)
    accel = next((r for r in rows if r["config"].startswith("accelerate")), None)
    for r in rows:
        if base:
            r["x_stream"] = r["tok_s"] / base["tok_s"]
    result = {"meta": meta, "rows": rows, "errors": errors, "seconds": time.perf_counter() - start}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "offload.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    log(f"\nwrote {path}; {meta['shape']} {meta['dtype']} on {meta['device']}, budget {args.budget}, "
        f"link {bw['h2d'] / 1e9:.1f} GB/s pinned H2D, device read {bw['device_read'] / 1e9:.0f} GB/s")
    log(f"{'config':40s} {'tok/s':>8s} {'x(b)':>6s} {'link MB/tok':>11s} {'hit':>6s} {'floor ms':>9s} {'%floor':>7s} "
        f"{'peak GiB':>8s} {'early rows':>10s}")
    for r in rows:
        peak = r.get("peak_device_bytes")
        early = (f"{r['rows_prefetched_per_token'] / max(r['rows_moved_per_token'], 1e-9):10.0%}"
                 if r.get("overlap") else f"{'':10s}")
        log(f"{r['config']:40s} {r['tok_s']:8.2f} {r.get('x_stream', float('nan')):6.2f} "
            f"{r.get('link_bytes_per_token', float('nan')) / 1e6:11.1f} {r.get('hit_rate', float('nan')):6.3f} "
            f"{r.get('floor_s', float('nan')) * 1e3:9.2f} {r.get('pct_of_floor', float('nan')):7.1f} "
            f"{(peak / 2**30 if peak else float('nan')):8.2f} {early}")
        if "projected" in r:
            p = r["projected"]
            log(f"{'  projected @ hit ' + format(p['hit_rate'], '.2f'):40s} {'':8s} {'':6s} "
                f"{p['link_bytes_per_token'] / 1e6:11.1f} {p['hit_rate']:6.3f} {p['floor_s'] * 1e3:9.2f}   (projection)")
    if base and accel:
        log(f"(b) / (a) = {base['tok_s'] / accel['tok_s']:.2f}x")
    overlap = next((r["overlap"] for r in rows if r.get("overlap")), None)
    if overlap:
        log(f"overlap: {overlap}; early rows = host rows started from the lookahead predictor's input")
    for e in errors:
        log(f"not measured: {e['config']}: {e['error']}")


if __name__ == "__main__":
    main()
