"""Lookahead prediction: D-COUNTDOWN's predictor fed from an earlier point of the residual stream, so
layer l's kept neurons are known before layer l's FFN starts (and their rows can be on their way).

Sources (``source=``):

* ``"attention"``: layer l's attention input (the output of its ``input_layernorm``): known before the
  attention runs, so a prefetch overlaps the whole attention;
* ``"previous"``: layer l−1's FFN input (DejaVu's lookahead); layer 0 uses its attention input.

The predictor is the same low-rank (or bitlinear) classifier, trained by the same loop
(`countdown.predictor.train_layer`) on the same labels (layer l's true top-(1 − s) of |t| in the dense
model), only with a different input; `train_lookahead` returns a `Predictors` that
`countdown.sparsify(model, "d-countdown", ..., predictors=...)` installs as usual, and
`use_lookahead(model, source)` then makes each sparse FFN's ``predict`` read the earlier input
(captured by forward hooks) instead of its own.
"""

from __future__ import annotations

import time
import types
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import calibration_windows
from .ffn import sparse_modules
from .models import FFNSite, ffn_sites
from .predictor import LayerReport, Predictors, _rank_for, get_recipe, train_layer

SOURCES = ("attention", "previous", "ffn")  # "ffn": the in-place predictor's own input, for comparison
_ATTR = "_countdown_lookahead"


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown lookahead source {source!r}; choose one of: {', '.join(SOURCES)}")


def attention_norms(model: nn.Module, sites: list[FFNSite]) -> list[nn.Module]:
    """Per layer, the module whose output is the attention input (``input_layernorm``)."""
    norms = [getattr(site.parent, "input_layernorm", None) for site in sites]
    if any(n is None for n in norms):
        raise ValueError("lookahead needs decoder layers with an input_layernorm (Llama, Mistral, Qwen, Gemma, Phi-3)")
    return norms


def source_for(layer: int, source: str) -> tuple[str, int]:
    """Which captured tensor feeds layer ``layer``'s predictor: ("attention" | "ffn", layer index)."""
    if source == "previous":
        return ("ffn", layer - 1) if layer > 0 else ("attention", 0)
    return (source, layer)


@torch.no_grad()
def collect_lookahead_pairs(model: nn.Module, windows: torch.Tensor, source: str,
                            progress: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, (predictor inputs [N, H] from ``source``, |t| [N, I] of that layer), float32 on the CPU."""
    xs, ts = collect_sources(model, windows, (source,), progress)
    return xs[source], ts


@torch.no_grad()
def collect_sources(model: nn.Module, windows: torch.Tensor, sources: tuple[str, ...] = SOURCES,
                    progress: bool = False) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """One pass over ``windows`` for several sources: ({source: per layer inputs [N, H]}, per layer
    |t| [N, I]), float32 on the CPU. The labels are shared, so comparing sources costs one copy of them."""
    for source in sources:
        _check_source(source)
    sites = ffn_sites(model)
    norms = attention_norms(model, sites)
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}
    ts: list[list[torch.Tensor]] = [[] for _ in sites]
    wanted = {source_for(i, s) for s in sources for i in range(len(sites))}

    def keep(key, x):
        if key in wanted:
            seen.setdefault(key, []).append(x.reshape(-1, x.shape[-1]).float().cpu())

    def ffn_hook(i, site):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            keep(("ffn", i), x)
            ts[i].append(site.coefficient(x).abs().float().cpu())
        return hook

    def norm_hook(i):
        def hook(module, args, out):
            keep(("attention", i), out)
        return hook

    handles = [site.input_module.register_forward_pre_hook(ffn_hook(i, site)) for i, site in enumerate(sites)]
    handles += [norm.register_forward_hook(norm_hook(i)) for i, norm in enumerate(norms)]
    device = next(model.parameters()).device
    try:
        for w in tqdm(windows, desc="collect lookahead pairs", disable=not progress, leave=False):
            model(input_ids=w.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    merged = {key: torch.cat(chunks) for key, chunks in seen.items()}
    xs = {s: [merged[source_for(i, s)] for i in range(len(sites))] for s in sources}
    return xs, [torch.cat(t) for t in ts]


def train_lookahead(model: nn.Module, sparsity: float, calibration: Any = None, tokenizer: Any = None, *,
                    source: str = "attention", rank: int | str = "auto", recipe: str = "countdown",
                    epochs: int | None = None, seq_len: int = 512, max_windows: int | None = 32,
                    pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> Predictors:
    """One predictor per layer for target ``sparsity`` fed from ``source`` (see the module docstring),
    trained exactly as `countdown.train_predictors` trains the in-place one (last tenth held out for
    the recall reports). ``pairs``: from `collect_lookahead_pairs`, to skip the collection pass."""
    get_recipe(recipe)
    sites = ffn_sites(model)
    if pairs is None:
        windows = calibration_windows(calibration, tokenizer, seq_len, max_windows)
        pairs = collect_lookahead_pairs(model, windows, source)
    xs, ts = pairs
    r = _rank_for(sites, rank, recipe)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    hidden, inter = sites[0].hidden_size, sites[0].intermediate_size
    layers, reports = [], []
    for i in range(len(sites)):
        t0 = time.time()
        params, metrics = train_layer(xs[i], ts[i], sparsity, r, recipe=recipe, epochs=epochs, device=device, seed=i)
        layers.append({k: v.to(dtype) for k, v in params.items()})
        size = r * (hidden + inter) + ("b" in params) * inter
        reports.append(LayerReport(i, r, predictor_fraction=size / (3 * hidden * inter), seconds=time.time() - t0,
                                   **metrics))
    return Predictors(layers, float(sparsity), reports, recipe, "lowrank")


def _predict_from(module: nn.Module, early: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The captured early input at the positions ``x`` (the FFN input of this call) holds."""
    if early.shape[:-1] == x.shape[:-1]:
        return early
    if module._row_mask is not None:  # a row split: the sparse rows
        early = early[module._row_mask]
        if early.shape[:-1] == x.shape[:-1]:
            return early
    rows = early.shape[0] if early.dim() == 3 else 1
    tail = x.numel() // x.shape[-1] // rows  # the sparse tail of a split forward (maybe flattened)
    return early[..., early.shape[-2] - tail:, :].reshape(*x.shape[:-1], early.shape[-1])


def use_lookahead(model: nn.Module, source: str = "attention") -> nn.Module:
    """Make every sparse FFN's predictor read ``source`` (captured by hooks) instead of its own input.

    The installed predictors must have been trained for that source (`train_lookahead`). Undo with
    `remove_lookahead` (also before `countdown.unsparsify`)."""
    _check_source(source)
    if model.__dict__.get(_ATTR) is not None:
        raise ValueError("lookahead is already in use on this model; call remove_lookahead(model) first")
    modules = sparse_modules(model)
    if not modules or not all(m.has_predictor for m in modules):
        raise ValueError("use_lookahead needs a model sparsified with d-countdown and (lookahead) predictors")
    sites = ffn_sites(model)
    norms = attention_norms(model, sites)
    captured: dict[tuple[str, int], torch.Tensor] = {}

    def norm_hook(i):
        def hook(module, args, out):
            captured[("attention", i)] = out
        return hook

    def ffn_hook(i):
        def hook(module, args):
            captured[("ffn", i)] = args[0]
        return hook

    handles = [norm.register_forward_hook(norm_hook(i)) for i, norm in enumerate(norms)]
    if source in ("previous", "ffn"):
        handles += [site.input_module.register_forward_pre_hook(ffn_hook(i)) for i, site in enumerate(sites)]
    for m in modules:
        key = source_for(m.layer_idx, source)
        original = type(m).predict.__get__(m)

        def predict(self, x, key=key, original=original):
            return original(_predict_from(self, captured[key], x))

        m.predict = types.MethodType(predict, m)
    model.__dict__[_ATTR] = (source, handles, modules)
    return model


def lookahead_source(model: nn.Module) -> str | None:
    """The source `use_lookahead` installed on ``model`` ("attention", "previous", "ffn"), or None."""
    state = model.__dict__.get(_ATTR)
    return state[0] if state is not None else None


def remove_lookahead(model: nn.Module) -> None:
    """Undo `use_lookahead`."""
    state = model.__dict__.pop(_ATTR, None)
    if state is None:
        raise ValueError("lookahead is not in use on this model")
    _, handles, modules = state
    for h in handles:
        h.remove()
    for m in modules:
        m.__dict__.pop("predict", None)
