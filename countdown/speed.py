"""End-to-end decode speed: tokens/s of dense and sparsified models through the same fast loop.

Every point runs `countdown.decode.Decoder` on the same model object in the same process, so the
only difference from the dense baseline is the FFN. Beside each measured speed-up stands the ideal
one from bytes: at batch 1 a decode step reads every weight once (the input embedding only one row)
plus the KV cache, and a sparse FFN reads only the fraction of its weights its kernel needs at the
sparsity actually measured on the generated tokens (plus the predictor, for D-COUNTDOWN).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .decode import Decoder
from .evaluate import perplexity
from .methods import get_method
from .models import UnsupportedModelError, attention_sites, ffn_sites
from .sweep import each_sparsified


@dataclass
class ModelBytes:
    weights: int  # weight bytes one decode step reads (tied or not, the input embedding reads one row)
    ffn: int  # of which the FFNs'
    kv_per_position: int  # KV-cache bytes per cached position, all layers
    attention: dict[str, int] = field(default_factory=dict)  # attention projections' bytes per site (qkv, o)

    def per_token(self, context: float, ffn_fraction: float = 1.0, extra: int = 0,
                  attention_skipped: dict[str, float] | None = None) -> float:
        skipped = sum(self.attention.get(site, 0) * s for site, s in (attention_skipped or {}).items())
        return self.weights - self.ffn * (1.0 - ffn_fraction) - skipped + extra + self.kv_per_position * context


def model_bytes(model: nn.Module) -> ModelBytes:
    params = list(model.parameters())  # tied weights appear once
    total = sum(_nbytes(p) for p in params)
    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    if emb_out is None or emb_in.weight is not emb_out.weight:
        total -= _nbytes(emb_in.weight)
    ffn = sum(_nbytes(m.weight) for site in ffn_sites(model) for m in site.modules.values())
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    elsize = params[0].element_size()
    kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * elsize
    attention = {}
    try:
        sites = attention_sites(model)
        attention = {"qkv": sum(_nbytes(p.weight) for s in sites for p in s.qkv), "o": sum(_nbytes(s.o.weight) for s in sites)}
    except UnsupportedModelError:
        pass  # attention input sparsity is offered for gated-FFN families only
    return ModelBytes(total, ffn, kv, attention)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def predictor_bytes(predictors: list[dict[str, torch.Tensor]] | None) -> int:
    if not predictors:
        return 0
    return sum(t.numel() * t.element_size() for p in predictors for t in p.values())


@dataclass
class SpeedPoint:
    method: str
    target: float
    measured: float  # skipped fraction of FFN neurons on the generated tokens
    tokens_per_s: float  # median over repeats
    ms_per_token: float
    prefill_ms: float
    speedup: float  # tokens/s over dense tokens/s, same process, same loop
    ideal_speedup: float  # dense bytes per token over this method's bytes per token
    bytes_per_token: float
    gb_per_s: float  # bytes a decode step reads (weights once, every sequence's KV cache) / time per step
    match_dense: float  # fraction of generated tokens equal to the dense model's at the same position
    runs: list[float] = field(default_factory=list)  # tokens/s of every timed repeat
    batch: int = 1  # sequences decoded together; tokens/s is per sequence
    memory_gib: float = float("nan")  # GPU memory allocated with the model sparsified (CUDA only)


def _timed(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int, compile: bool):
    decoder = Decoder(model, max_len=prompt.shape[-1] + new_tokens, batch_size=prompt.shape[0], compile=compile)
    decoder.generate(prompt, new_tokens)  # warm-up, CUDA-graph capture, kernel autotuning
    results = [decoder.generate(prompt, new_tokens) for _ in range(repeats)]
    return results


def measure_speed(
    model: nn.Module,
    methods: list[str],
    sparsities: list[float],
    prompt: torch.Tensor,
    calibration: torch.Tensor,
    *,
    new_tokens: int = 256,
    repeats: int = 5,
    predictors_for: Callable[[float], list] | None = None,
    compile: bool = False,
    positions: str = "decode",
    attention: float | None = None,
    log: Callable[[str], None] = print,
) -> list[SpeedPoint]:
    """Dense first, then every (method, sparsity) in threshold mode; returns one point each.

    ``prompt`` [B, P] token ids (B sequences decoded together, 1 to 16); ``calibration`` [n, L] token
    windows for the thresholds. ``attention``: input sparsity of the attention projections too (every
    method, same target). The ideal speed-up from bytes is given at batch 1 only (a batch reads
    the union of its kept rows, which per-token sparsity does not tell)."""
    for name in methods:
        if get_method(name).needs_predictor and predictors_for is None:
            raise ValueError(f"{name} needs predictors: pass predictors_for")
    if repeats < 1 or new_tokens < 2:
        raise ValueError("need repeats >= 1 and new_tokens >= 2")
    nbytes = model_bytes(model)
    context = prompt.shape[-1] + new_tokens / 2  # mean cached positions over the decode steps
    dense_bytes = nbytes.per_token(context)

    batch = prompt.shape[0]
    context *= batch  # a step reads every sequence's KV cache

    def point(method: str, target: float, measured: float, ffn_fraction: float, extra: int, results, dense,
              attention_skipped=None):
        runs = [r.tokens_per_second for r in results]
        tps = statistics.median(runs)
        b = nbytes.per_token(context, ffn_fraction, extra, attention_skipped)
        gen = results[0].tokens[0, prompt.shape[-1]:]
        match = float((gen == dense[0]).float().mean()) if dense is not None else 1.0
        ideal = dense_bytes / b if batch == 1 else float("nan")
        memory = torch.cuda.memory_allocated(prompt.device if prompt.is_cuda else None) / 2**30 \
            if torch.cuda.is_available() and next(model.parameters()).is_cuda else float("nan")
        return SpeedPoint(method, target, measured, tps, 1e3 / tps, 1e3 * statistics.median(r.prefill_seconds for r in results),
                          tps / dense[1] if dense is not None else 1.0, ideal, b, b * tps / 1e9, match, runs,
                          batch, memory)

    dense_results = _timed(model, prompt, new_tokens, repeats, compile)
    dense_point = point("dense", 0.0, 0.0, 1.0, 0, dense_results, None)
    dense = (dense_results[0].tokens[0, prompt.shape[-1]:], dense_point.tokens_per_s)
    log(f"dense: {dense_point.tokens_per_s:.1f} tokens/s ({dense_point.gb_per_s:.0f} GB/s)")
    points = [dense_point]
    todo = {name: list(sparsities) for name in methods}
    for name, s, preds in each_sparsified(model, todo, calibration, positions=positions, predictors_for=predictors_for,
                                          attention=attention, progress=False):
        results = _timed(model, prompt, new_tokens, repeats, compile)
        # sparsity the masks really had on the generated tokens of the first sequence (reference path)
        seq = results[0].tokens[0]
        seen = perplexity(model, seq, context=seq.numel(), stride=new_tokens, positions=positions, progress=False)
        p = point(name, s, seen.sparsity, seen.ffn_bytes_read, predictor_bytes(preds), results, dense,
                  seen.attention_sparsity)
        points.append(p)
        log(f"{name} @ {s:.0%}: {p.tokens_per_s:.1f} tokens/s, {p.speedup:.2f}x (ideal {p.ideal_speedup:.2f}x), "
            f"measured sparsity {p.measured:.1%}")
    return points


def speed_markdown(points: list[SpeedPoint], title: str = "") -> str:
    head = f"**{title}**\n\n" if title else ""
    lines = [
        "| method | target | batch | measured | tokens/s per sequence | ms/token | speed-up | ideal (bytes) | % of ideal | GB/s | GPU GiB | same tokens as dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        target = "—" if p.method == "dense" else f"{p.target:.0%}"
        measured = "—" if p.method == "dense" else f"{p.measured:.1%}"
        ideal = "—" if p.ideal_speedup != p.ideal_speedup else f"{p.ideal_speedup:.2f}×"
        of_ideal = "—" if p.ideal_speedup != p.ideal_speedup else f"{p.speedup / p.ideal_speedup:.0%}"
        lines.append(f"| {p.method} | {target} | {p.batch} | {measured} | {p.tokens_per_s:.1f} | {p.ms_per_token:.3f} | "
                     f"{p.speedup:.2f}× | {ideal} | {of_ideal} | {p.gb_per_s * p.batch:.0f} | {p.memory_gib:.1f} | "
                     f"{p.match_dense:.0%} |")
    return head + "\n".join(lines) + "\n"
