"""Decode speed of a tensor-parallel sparsified model (issue 14): dense vs M-COUNTDOWN 70/90% and
D-COUNTDOWN 90%, batch 1, through `countdown.decode.Decoder` (one CUDA graph per step; the all-reduces
of attention and FFN are inside the graph).

    torchrun --nproc_per_node 2 bench/tp_decode.py                      # 70B at TP=2, 8B at TP=1 and TP=2
    torchrun --nproc_per_node 2 bench/tp_decode.py --shape tiny --device cpu   # gloo, a check on the CPU

Models are Llama-3-shaped with random bf16 weights (decode speed depends on bytes, not values), built on
the meta device, sharded with `countdown.parallel.shard_model` (torch's parallelize_module with the
model's TP plan) and only then materialised: each rank allocates its own shards, never the whole model.
Thresholds come from the sharded model itself: FFN inputs of one random 64-token window, each rank's
scores of its neurons all-gathered into a `Calibration` (the global per-layer quantiles). D-COUNTDOWN
runs untrained predictors of the paper's size. The TP=1 row runs on rank 0 alone (the others wait).
Every rank decodes the same prompt; rank 0 prints a table last and writes JSON to $OUT (or --out).
"""

from __future__ import annotations

import os

# NVLink multicast stays off on the shared GPU machines (see the device notes)
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers as tf  # noqa: E402
from _common import log as common_log  # noqa: E402

import countdown  # noqa: E402
from countdown import parallel  # noqa: E402
from countdown.calibrate import Calibration  # noqa: E402
from countdown.decode import Decoder  # noqa: E402
from countdown.predictor import Predictors, auto_rank  # noqa: E402

SHAPES = {
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
CONFIGS = [("dense", None, 0.0), ("m-countdown", "m-countdown", 0.7), ("m-countdown", "m-countdown", 0.9),
           ("d-countdown", "d-countdown", 0.9)]


def log(*args) -> None:
    if parallel.is_writer():  # one rank prints
        common_log(*args)


def build(shape: str, tp: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    cfg = tf.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rope_theta=500000.0)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        parallel.shard_model(model, init_device_mesh(device.type, (tp,)))
    model.to_empty(device=device)
    torch.manual_seed(0)  # same stream on every rank: replicated weights agree, shards have equal shapes
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = parallel.local(p)
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02)
        # to_empty left the rotary buffers uninitialised
        with torch.device(device):  # (the constructor's arguments differ between transformers versions)
            model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    return model.eval()


def gather(t: torch.Tensor, tp: int) -> torch.Tensor:
    if tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def sharded_calibration(model, method: str, preds: Predictors | None, tp: int, device) -> Calibration:
    """Per-layer global score samples from the sharded model: each rank scores its neurons, all-gather."""
    sites = countdown.ffn_sites(model)
    inputs = {}
    hooks = [s.module.register_forward_pre_hook(lambda m, a, i=s.layer: inputs.__setitem__(i, a[0]))
             for s in sites]
    g = torch.Generator().manual_seed(1)
    model(input_ids=torch.randint(0, model.config.vocab_size, (1, 64), generator=g).to(device))
    for h in hooks:
        h.remove()
    samples = []
    for s in sites:
        x = inputs[s.layer].reshape(-1, inputs[s.layer].shape[-1])
        if method == "m-countdown":
            score = (x @ parallel.local(s.modules["up_proj"].weight).t()).abs()
        else:
            shard = parallel.ffn_shard(s)
            lo, hi = (shard.start, shard.stop) if shard else (0, s.intermediate_size)
            p = preds[s.layer]
            score = (x @ p["V"]) @ p["U"][lo:hi].t() + p["b"][lo:hi]
        samples.append({"coef": gather(score.float(), tp).flatten().cpu()})
    return Calibration(method, countdown.fingerprint(model), ("coef",), samples)


def predictors(model, device, dtype) -> Predictors:
    h, i = model.config.hidden_size, model.config.intermediate_size
    r = auto_rank(h, i)
    g = torch.Generator(device=device).manual_seed(2)  # the same on every rank: V whole, U/b cut per rank
    layers = [{"V": torch.randn(h, r, generator=g, device=device, dtype=dtype) / h ** 0.5,
               "U": torch.randn(i, r, generator=g, device=device, dtype=dtype) / r ** 0.5,
               "b": torch.zeros(i, device=device, dtype=dtype)} for _ in range(model.config.num_hidden_layers)]
    return Predictors(layers, 0.9)


def decode_speed(model, device, steps: int, repeats: int, graph: str) -> tuple[float, list[float]]:
    dec = Decoder(model, 16 + steps + 1, batch_size=1, cuda_graph="auto" if graph == "auto" else False)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    dec.generate(prompt, steps)  # warm-up and capture
    runs = [dec.generate(prompt, steps).tokens_per_second for _ in range(repeats)]
    return statistics.median(runs), runs


def run_shape(shape: str, tp: int, args, device, dtype) -> list[dict]:
    rows = []
    t0 = time.perf_counter()
    model = build(shape, tp, device, dtype)
    n_params = sum(parallel.local(p).numel() for p in model.parameters())
    log(f"[{shape} tp={tp}] built in {time.perf_counter() - t0:.0f}s: {n_params / 1e9:.2f}B params on this rank")
    cals, preds = {}, None
    for label, method, sparsity in CONFIGS:
        if method is not None:
            if method == "d-countdown" and preds is None:
                preds = predictors(model, device, dtype)
            if method not in cals:
                cals[method] = sharded_calibration(model, method, preds if method == "d-countdown" else None, tp, device)
            countdown.sparsify(model, method, sparsity, calibration=cals[method], progress=False,
                               predictors=preds if method == "d-countdown" else None)
        tps, runs = decode_speed(model, device, args.steps, args.repeats, args.cuda_graph)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append({"shape": shape, "tp": tp, "config": label, "sparsity": sparsity, "tokens_per_s": tps,
                     "runs": runs, "max_mem_gib_rank": mem, "steps": args.steps})
        log(f"  {label:12s} {sparsity:.0%}: {tps:8.1f} tok/s  (runs {[round(r, 1) for r in runs]})")
        if method is not None:
            countdown.unsparsify(model)
    del model, preds, cals
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["all", *SHAPES], default="all")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cuda-graph", choices=["auto", "off"], default="auto",
                    help="off: eager decode steps (if capturing the collectives fails)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    else:
        device, dtype = torch.device("cpu"), torch.float32
        args.steps = min(args.steps, 8)
    plan = [("70b", world), ("8b", world), ("8b", 1)] if args.shape == "all" else [(args.shape, world), (args.shape, 1)]
    rows = []
    for shape, tp in plan:
        if tp == 1 and world > 1:
            if rank == 0:  # the others wait; no collective runs inside a TP=1 model
                rows += run_shape(shape, 1, args, device, dtype)
            dist.barrier()
        else:
            rows += run_shape(shape, tp, args, device, dtype)
    if rank == 0:
        info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "world": world, "torch": torch.__version__, "transformers": tf.__version__, "rows": rows}
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "tp_decode.json")
        with open(path, "w") as f:
            json.dump(info, f, indent=1)
        dense = {(r["shape"], r["tp"]): r["tokens_per_s"] for r in rows if r["config"] == "dense"}
        print(f"\n{info['device']} x{world}, batch 1, {args.steps} decode steps, median of {args.repeats}; JSON: {path}")
        print("| shape | TP | config | sparsity | tokens/s | vs dense | max GiB/rank |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            base = dense[(r["shape"], r["tp"])]
            print(f"| {r['shape']} | {r['tp']} | {r['config']} | {r['sparsity']:.0%} | {r['tokens_per_s']:.1f} | "
                  f"{r['tokens_per_s'] / base:.2f}x | {r['max_mem_gib_rank']:.1f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
