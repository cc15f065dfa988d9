"""Perplexity (sliding window) and the sparsity the model actually had while computing it.

Which positions are sparse follows the model's `SparsitySpec.positions`:

* ``"all"`` (strict): every position of every window goes through the sparse FFNs, context tokens
  included, each masked with its own scores; windows are back to back by default.
* ``"decode"`` (the official COUNTDOWN protocol): each window's context runs densely, as a prefill
  would, and only the scored positions are sparse, so the first scored token is predicted by a dense
  position, exactly as prefill-then-decode generation produces it. Windows then overlap by half by
  default (``stride = context // 2``) and score only their last ``stride`` tokens, the first window too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import attention, ffn
from .spec import POSITIONS


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    n_tokens: int
    # measured skipped fraction at the method's reported site (the coefficient vector, site "coef",
    # where the method masks it; see Method.reported_site), per layer and overall
    layer_sparsity: list[float] = field(default_factory=list)
    sparsity: float = float("nan")
    # per-site measured fractions (TEAL has an "input" site too)
    site_sparsity: dict[str, float] = field(default_factory=dict)
    # fraction of FFN weight bytes a kernel for this method reads at the measured sparsity
    ffn_bytes_read: float = 1.0
    positions: str = "all"  # which positions were sparse (see the module docstring)
    # measured skipped fraction of attention-projection input channels per site ("qkv", "o"), if any
    attention_sparsity: dict[str, float] = field(default_factory=dict)


def score_spans(n_tokens: int, context: int, stride: int, score_first_window: bool = True) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) windows: each window is ``context`` tokens ending at ``end``; only the
    last ``n_scored`` positions are scored, so every token is scored once with up to ``context`` of
    history (the Hugging Face sliding-window recipe). Without ``score_first_window`` the first window
    scores only its last ``stride`` tokens, so every scored token has some context."""
    if stride <= 0 or stride > context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    spans, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        n_scored = end - prev_end
        if not spans and not score_first_window:
            n_scored = min(n_scored, stride)
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
    positions: str | None = None,
    prefix: Sequence[int] = (),
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``token_ids`` ([n] or [1, n]) under the model, with measured FFN sparsity.

    ``positions`` ("all" or "decode") picks the protocol; default: the model's `SparsitySpec` (a dense
    model: "all"). Give the sparse model's protocol to a dense model so both score the same tokens.
    ``prefix`` (`data.document_prefix`: Gemma's ``<bos>``) goes before every window, unscored."""
    ids = token_ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to compute perplexity")
    spec = ffn.sparsity_spec(model)
    positions = positions or (spec.positions if spec is not None else "all")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if spec is not None and spec.positions != positions:
        raise ValueError(f"the model was sparsified with positions={spec.positions!r}; evaluate it with that")
    decode_protocol = positions == "decode"
    stride = stride or (context // 2 if decode_protocol else context)
    device = next(model.parameters()).device
    modules = ffn.sparse_modules(model)
    projections = attention.sparse_projections(model)
    for m in modules + projections:
        m.meter = ffn.SparsityMeter()
    head = torch.tensor(list(prefix), dtype=ids.dtype)
    total_nll, total_tokens = 0.0, 0
    try:
        spans = score_spans(ids.numel(), context, stride, score_first_window=not decode_protocol)
        for begin, end, n_scored in tqdm(spans, desc="perplexity", disable=not progress, leave=False):
            window = torch.cat([head, ids[begin:end]]).to(device).unsqueeze(0)
            for m in modules + projections:  # the window's context dense, the scored continuation sparse
                m.sparse_from = window.shape[1] - n_scored if decode_protocol else None
            logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
            targets = window[0, 1:]
            n = min(n_scored, targets.numel())
            nll = F.cross_entropy(logits[-n:], targets[-n:], reduction="sum")
            total_nll += float(nll)
            total_tokens += n
    finally:
        meters = [m.meter for m in modules]
        attention_meters = [(p.site, p.meter) for p in projections]
        for m in modules + projections:
            m.meter, m.sparse_from = None, None
    result = PerplexityResult(math.exp(total_nll / total_tokens), total_nll / total_tokens, total_tokens,
                              positions=positions)
    if modules:
        _attach_sparsity(result, modules, meters)
    for site in attention.SITES:
        measured = [meter.measured((site,))[site] for name, meter in attention_meters if name == site]
        if measured:
            result.attention_sparsity[site] = sum(measured) / len(measured)
    return result


def measured_sparsity(modules: list, meters: list[ffn.SparsityMeter]) -> dict:
    """What ``meters`` (one per sparse FFN of ``modules``) counted: ``sparsity`` (the skipped fraction at
    the method's reported site, "coef" for most methods; 0 if it has none), ``layer_sparsity`` (per
    layer), ``site_sparsity`` (per site, layer-averaged) and ``ffn_bytes_read`` (the fraction of FFN
    weight bytes a kernel reads at these sparsities)."""
    sites = modules[0].spec.sites
    per_layer = [meter.measured(sites) for meter in meters]
    site_sparsity = {s: sum(layer[s] for layer in per_layer) / len(per_layer) for s in sites}
    reported = modules[0].method.reported_site  # "coef" (the down input) for most methods
    if reported in sites:
        layer_sparsity, sparsity = [layer[reported] for layer in per_layer], site_sparsity[reported]
    else:
        layer_sparsity, sparsity = [0.0] * len(per_layer), 0.0
    read = [m.method.ffn_bytes_read(m.kind, layer) for m, layer in zip(modules, per_layer)]
    return {"sparsity": sparsity, "layer_sparsity": layer_sparsity, "site_sparsity": site_sparsity,
            "ffn_bytes_read": sum(read) / len(read)}


def _attach_sparsity(result: PerplexityResult, modules: list, meters: list[ffn.SparsityMeter]) -> None:
    for key, value in measured_sparsity(modules, meters).items():
        setattr(result, key, value)
