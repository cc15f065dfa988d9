"""Hot neurons: how often a sparsified model keeps each FFN neuron, and how well a resident set chosen
from that (on calibration text) covers what other text keeps.

This is the statistic behind `countdown.offload`'s resident set (PowerInfer's "hot" neurons): the
neurons kept most often on calibration text stay on the device, and the *hit rate* on held-out text,
the fraction of kept neurons (counted per token) that are resident, says how many of the bytes a token
needs never cross the host-to-device link. Masks are the installed method's own (``module.keep``:
same thresholds, same score) at every position of each window (``sparse_from = 0`` while measuring).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Sequence

import torch
from torch import nn

from .data import calibration_windows
from .ffn import sparse_modules


@contextmanager
def _recording(model: nn.Module, see):
    """Every sparse FFN calls ``see(layer, coef_mask [N, I] bool)`` with the masks it applies, at every
    position of every forward, while inside."""
    modules = sparse_modules(model)
    if not modules:
        raise ValueError("hot-neuron statistics need a sparsified model; call countdown.sparsify(model, ...) first")
    saved = [(m.sparse_from, m.__dict__.get("keep")) for m in modules]

    def wrap(m):
        original = type(m).keep.__get__(m)

        def keep(site, score):
            mask = original(site, score)
            if site == "coef":
                see(m.layer_idx, (mask != 0).reshape(-1, mask.shape[-1]))
            return mask

        return keep

    try:
        for m in modules:
            m.sparse_from = 0
            m.keep = wrap(m)
        yield modules
    finally:
        for m, (sparse_from, keep) in zip(modules, saved):
            m.sparse_from = sparse_from
            m.__dict__.pop("keep", None)
            if keep is not None:
                m.keep = keep


@torch.no_grad()
def keep_counts(model: nn.Module, windows: Any, tokenizer: Any = None, *, seq_len: int = 256,
                max_windows: int | None = 16) -> tuple[list[torch.Tensor], int]:
    """(per layer, how many tokens kept each neuron [I] int64; tokens seen) on ``windows`` (texts with
    ``tokenizer``, or token windows [n, L])."""
    windows = calibration_windows(windows, tokenizer, seq_len, max_windows)
    counts: dict[int, torch.Tensor] = {}
    tokens = [0]

    def see(layer: int, mask: torch.Tensor) -> None:
        c = mask.sum(0).cpu()
        counts[layer] = counts[layer] + c if layer in counts else c
        if layer == 0:
            tokens[0] += mask.shape[0]

    device = next(model.parameters()).device
    with _recording(model, see) as modules:
        for w in windows:
            model(input_ids=w.unsqueeze(0).to(device), use_cache=False)
    return [counts[m.layer_idx] for m in modules], tokens[0]


def keep_frequencies(model: nn.Module, windows: Any, tokenizer: Any = None, **kwargs) -> list[torch.Tensor]:
    """Per layer, the fraction of tokens that keep each neuron ([I] float32): `offload`'s ``frequencies``."""
    counts, tokens = keep_counts(model, windows, tokenizer, **kwargs)
    return [c.float() / max(tokens, 1) for c in counts]


def resident_sets(frequencies: Sequence[torch.Tensor], fraction: float, rule: str = "global") -> list[torch.Tensor]:
    """Per layer, the ids of the resident neurons when ``fraction`` of all FFN neurons fit: "global" takes
    the most frequent over all layers together (what `offload` does), "per-layer" the same share of
    every layer."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    inter = frequencies[0].numel()
    if rule == "per-layer":
        n = int(round(fraction * inter))
        return [f.float().topk(n).indices for f in frequencies]
    if rule != "global":
        raise ValueError(f"rule must be 'global' or 'per-layer', got {rule!r}")
    flat = torch.stack([f.float().cpu() for f in frequencies]).flatten()
    top = flat.topk(int(round(fraction * flat.numel()))).indices
    return [top[top // inter == i] % inter for i in range(len(frequencies))]


@torch.no_grad()
def hit_rates(model: nn.Module, resident: Sequence[torch.Tensor], windows: Any, tokenizer: Any = None, *,
              seq_len: int = 256, max_windows: int | None = 16) -> dict:
    """Fraction of kept neurons (per token) that are in ``resident`` (per layer ids) on ``windows``:
    ``{"hit_rate": pooled over layers, "per_layer": [...], "kept_fraction": mean kept share, "tokens": n}``."""
    modules = sparse_modules(model)
    masks = []
    for m, ids in zip(modules, resident):
        mask = torch.zeros(m.gate_weight().shape[0], dtype=torch.bool)
        mask[ids.long().cpu()] = True
        masks.append(mask)
    position = {m.layer_idx: i for i, m in enumerate(modules)}
    hits = [0] * len(modules)
    kept = [0] * len(modules)
    entries = [0] * len(modules)

    def see(layer: int, mask: torch.Tensor) -> None:
        i = position[layer]
        mask = mask.cpu()
        hits[i] += int((mask & masks[i]).sum())
        kept[i] += int(mask.sum())
        entries[i] += mask.numel()

    windows = calibration_windows(windows, tokenizer, seq_len, max_windows)
    device = next(model.parameters()).device
    with _recording(model, see):
        for w in windows:
            model(input_ids=w.unsqueeze(0).to(device), use_cache=False)
    return {"hit_rate": sum(hits) / max(sum(kept), 1), "per_layer": [h / max(k, 1) for h, k in zip(hits, kept)],
            "kept_fraction": sum(kept) / max(sum(entries), 1), "tokens": entries[0] // max(masks[0].numel(), 1)}
