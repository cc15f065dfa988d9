"""Perplexity (sliding window) and the sparsity the model actually had while computing it.

Every token position of every window goes through the sparse FFNs, context tokens included: each
position is masked independently with its own scores, as a decode step would be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import ffn


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    n_tokens: int
    # measured skipped fraction of the coefficient vector (site "coef"), per layer and overall
    layer_sparsity: list[float] = field(default_factory=list)
    sparsity: float = float("nan")
    # per-site measured fractions (TEAL has an "input" site too)
    site_sparsity: dict[str, float] = field(default_factory=dict)
    # fraction of FFN weight bytes a kernel for this method reads at the measured sparsity
    ffn_bytes_read: float = 1.0


def score_spans(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) windows: each window is ``context`` tokens ending at ``end``; only the
    last ``n_scored`` positions are scored, so every token is scored once with up to ``context`` of
    history (the Hugging Face sliding-window recipe)."""
    if stride <= 0 or stride > context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    spans, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        n_scored = end - prev_end
        if n_scored > 0 and end - begin > 1:
            spans.append((begin, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return spans


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    *,
    context: int = 512,
    stride: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``token_ids`` ([n] or [1, n]) under the model, with measured FFN sparsity."""
    ids = token_ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to compute perplexity")
    stride = stride or context
    device = next(model.parameters()).device
    modules = ffn.sparse_modules(model)
    for m in modules:
        m.masker.reset_stats()
        m.masker.track = True
    total_nll, total_tokens = 0.0, 0
    try:
        for begin, end, n_scored in tqdm(score_spans(ids.numel(), context, stride), desc="perplexity", disable=not progress, leave=False):
            window = ids[begin:end].to(device).unsqueeze(0)
            logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
            targets = window[0, 1:]
            n = min(n_scored, targets.numel())
            nll = F.cross_entropy(logits[-n:], targets[-n:], reduction="sum")
            total_nll += float(nll)
            total_tokens += n
    finally:
        for m in modules:
            m.masker.track = False
    result = PerplexityResult(math.exp(total_nll / total_tokens), total_nll / total_tokens, total_tokens)
    if modules:
        _attach_sparsity(result, modules)
    return result


def _attach_sparsity(result: PerplexityResult, modules: list) -> None:
    per_layer = [m.masker.measured() for m in modules]
    sites = modules[0].masker.sites
    result.site_sparsity = {s: sum(layer[s] for layer in per_layer) / len(per_layer) for s in sites}
    if "coef" in sites:
        result.layer_sparsity = [layer["coef"] for layer in per_layer]
        result.sparsity = result.site_sparsity["coef"]
    else:
        result.layer_sparsity = [0.0] * len(per_layer)
        result.sparsity = 0.0
    read = [m.method.ffn_bytes_read(m.kind, layer) for m, layer in zip(modules, per_layer)]
    result.ffn_bytes_read = sum(read) / len(read)
