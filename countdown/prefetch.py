"""Prefetch analysis for memory-limited devices (the guideline of Dhar et al., arXiv 2412.12178).

On an edge device the FFN weights live in slow memory (flash, DRAM behind a small cache) and each
token only needs the weights of its *active* neurons. Two questions decide how much traffic that saves:

1. **Reuse.** How many of token n's active neurons were already active at the previous token(s)? If a
   fast-memory cache keeps the neurons of the last k tokens, that fraction is the cache's hit rate.
2. **Prediction.** A predictor (D-COUNTDOWN's low-rank one) picks the neurons to fetch before the FFN
   runs. How much of the dense FFN's bytes must still come from slow memory for a predictor of a
   given recall, with and without such a cache?

The active set of a token is what D-COUNTDOWN-ideal keeps in top-k mode: the top ``(1 − s)·I`` neurons
of the direct coefficient ``|t|`` (``t = act(W_gate x) ⊙ (W_up x)``, or ``act(W_in x)`` for plain
FFNs), measured on the dense model. One neuron means one row of ``W_gate`` and ``W_up`` and one column
of ``W_down`` (one row of ``W_in``, one column of ``W_out``): every neuron has the same weight bytes, so
byte fractions equal neuron fractions.

Positions never bridge a window boundary: each evaluation window is its own sequence, as in decode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .ffn import is_sparsified
from .methods import check_sparsity, keep_count
from .models import FFNSite, ffn_sites

DEFAULT_SPARSITIES: tuple[float, ...] = (0.5, 0.7, 0.9)
DEFAULT_CACHE_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16)
DEFAULT_RECALLS: tuple[float, ...] = (1.0, 0.9, 0.8)


def _check_windows(windows: torch.Tensor) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0:
        raise ValueError("windows must be a non-empty [n_windows, seq_len] tensor of token ids")
    if windows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"windows must hold integer token ids, got {windows.dtype}")
    return windows.long()


@torch.no_grad()
def _iter_window_masks(
    model: nn.Module, windows: torch.Tensor, sparsities: Sequence[float]
) -> Iterator[list[list[torch.Tensor]]]:
    """For each window in turn: ``masks[j][layer]`` = BoolTensor [seq, I], the active sets at ``sparsities[j]``.

    One dense forward per window serves every sparsity; only bool masks are kept (the float |t| of a
    layer is dropped as soon as its top-k is taken), so memory is O(seq · I · layers) per window.
    """
    sparsities = [check_sparsity(s) for s in sparsities]
    windows = _check_windows(windows)
    if is_sparsified(model):
        raise ValueError("the prefetch analysis needs the dense model; call countdown.unsparsify(model) first")
    sites = ffn_sites(model)
    current: list[list[torch.Tensor | None]] = [[None] * len(sites) for _ in sparsities]

    def hook_for(i: int, site: FFNSite):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            # same score and same topk call as the D-COUNTDOWN-ideal top-k masker, so ties break alike
            score = site.coefficient(x).abs()
            for j, s in enumerate(sparsities):
                idx = score.topk(keep_count(score.shape[-1], s), dim=-1).indices
                mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
                current[j][i] = mask.scatter_(-1, idx, True).cpu()

        return hook

    handles = [site.input_module.register_forward_pre_hook(hook_for(i, site)) for i, site in enumerate(sites)]
    device = next(model.parameters()).device
    try:
        for w in windows:
            model(input_ids=w.unsqueeze(0).to(device), use_cache=False)
            yield [list(per_layer) for per_layer in current]  # type: ignore[misc]
    finally:
        for h in handles:
            h.remove()


def active_sets(model: nn.Module, windows: torch.LongTensor, sparsity: float) -> list[torch.Tensor]:
    """Per layer, the active sets of every token: BoolTensor ``[n_windows, seq_len, I]``.

    ``mask[w, n, i]`` is True when neuron i is among the top ``(1 − sparsity)·I`` of ``|t|`` at position
    n of window w in the dense model (exactly what D-COUNTDOWN-ideal keeps in top-k mode). Windows stay
    separate along dim 0, so no reuse is ever counted across a window boundary.
    """
    per_window = [masks[0] for masks in _iter_window_masks(model, windows, [sparsity])]
    return [torch.stack([m[layer] for m in per_window]) for layer in range(len(per_window[0]))]


def _check_cache_sizes(cache_sizes: Sequence[int], seq_len: int) -> list[int]:
    sizes = sorted({int(k) for k in cache_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"cache sizes must be positive token counts, got {list(cache_sizes)}")
    if sizes[-1] >= seq_len:
        raise ValueError(f"largest cache size {sizes[-1]} leaves no position to measure in windows of {seq_len} tokens")
    return sizes


def _reuse_sums(mask: torch.Tensor, cache_sizes: list[int], same_positions: bool) -> torch.Tensor:
    """Per cache size k (columns): [sum of hit rates, positions with a hit rate, sum of occupancies,
    positions measured] as a float64 tensor [4, len(cache_sizes)]; sums let windows be added up.

    ``mask``: BoolTensor [n_windows, seq, I] (or [seq, I]). The cache at position n holds
    ``A_{n-1} ∪ … ∪ A_{n-k}``; it is built by OR-ing in one more shifted copy of the mask per k, so all
    cache sizes together cost one pass up to the largest.
    """
    if mask.dim() == 2:  # one window
        mask = mask.unsqueeze(0)
    seq, width = mask.shape[1], mask.shape[2]
    union = torch.zeros_like(mask)
    out = torch.zeros(4, len(cache_sizes), dtype=torch.float64)
    for k in range(1, cache_sizes[-1] + 1):
        union[:, k:] |= mask[:, : seq - k]  # positions n ≥ k now also hold A_{n-k}
        if k not in cache_sizes:
            continue
        first = cache_sizes[-1] if same_positions else k
        now, cached = mask[:, first:], union[:, first:]
        active = now.sum(-1)
        hits = (now & cached).sum(-1)
        has_active = active > 0  # an empty active set has no hit rate (never happens with top-k sets)
        q = cache_sizes.index(k)
        out[0, q] = (hits[has_active].double() / active[has_active]).sum()
        out[1, q] = has_active.sum()
        out[2, q] = cached.sum(-1).double().sum() / width
        out[3, q] = active.numel()
    return out


def reuse_curve(
    masks: Sequence[torch.Tensor], cache_sizes: Sequence[int] = DEFAULT_CACHE_SIZES, *, same_positions: bool = True
) -> dict[str, list]:
    """Hit rate and occupancy of a cache of the last k tokens' active neurons, per layer.

    ``masks``: per layer a BoolTensor ``[n_windows, seq, I]`` (or ``[seq, I]``), e.g. from `active_sets`.
    For each layer and k:

    * ``hit_rate`` = mean over positions n of ``|A_n ∩ (A_{n-1} ∪ … ∪ A_{n-k})| / |A_n|``
      (k = 1 is plain reuse between consecutive tokens);
    * ``occupancy`` = mean of ``|A_{n-1} ∪ … ∪ A_{n-k}| / I``: the share of the FFN's weights the
      cache holds in fast memory.

    Positions are counted inside each window only. With ``same_positions`` (the default) every k is
    averaged over the same positions ``n ≥ max(cache_sizes)``, so the curves compare like with like and
    are non-decreasing in k; without it, k uses all positions ``n ≥ k``.

    Returns ``{"cache_sizes": [k...], "hit_rate": [[per k] per layer], "occupancy": [[per k] per layer]}``.
    """
    if not masks:
        raise ValueError("reuse_curve needs at least one layer's masks")
    sizes = _check_cache_sizes(cache_sizes, masks[0].shape[-2])
    sums = [_reuse_sums(m.bool(), sizes, same_positions) for m in masks]
    return {"cache_sizes": sizes, **_means(sums)}


def _means(sums: list[torch.Tensor]) -> dict[str, list[list[float]]]:
    """Per-layer means from `_reuse_sums` totals (NaN where no position was measured)."""
    return {
        "hit_rate": [(s[0] / s[1]).tolist() for s in sums],
        "occupancy": [(s[2] / s[3]).tolist() for s in sums],
    }


def traffic_with_predictor(
    sparsity: float,
    recall: float = 1.0,
    cache_hit: float = 0.0,
    cache_occupancy: float = 0.0,
    *,
    precision: float | None = None,
    predictor_fraction: float = 0.0,
) -> float:
    """Fraction of the dense FFN's weight bytes fetched from slow memory per token and layer.

    Model and assumptions (kept deliberately simple):

    * Every neuron has the same bytes (one row of gate and up, one column of down), so bytes ∝ neurons;
      the dense FFN fetches all I neurons (= 1.0). The true active set has ``(1 − s)·I`` neurons.
    * The predictor fetches a set P of neurons before the FFN runs. ``recall`` = share of the active
      set in P; ``precision`` = share of P that is active. By default ``precision = recall``: the
      predictor fetches exactly ``(1 − s)·I`` neurons (top-k of its scores, as D-COUNTDOWN in top-k
      mode). Missed active neurons cost quality, not traffic; false positives cost traffic.
    * With a cache of the last k tokens' neurons in fast memory, only the non-cached part of P is
      fetched. A truly active neuron in P is cached with probability ``cache_hit`` (the measured hit
      rate of active sets); a false positive with probability ``cache_occupancy`` (it is assumed no
      likelier to be cached than any neuron). The cache is assumed to hold the past tokens' true active
      sets (what a perfect predictor would have fetched), and its own memory is ``cache_occupancy · I``.
    * ``predictor_fraction``: the predictor's own weights per token, in dense-FFN units, when they are
      streamed too (0 when they stay resident in fast memory).

    Result: ``TP·(1 − cache_hit) + FP·(1 − cache_occupancy) + predictor_fraction`` with
    ``TP = recall·(1 − s)`` and ``FP = TP·(1/precision − 1)``.
    """
    s = check_sparsity(sparsity)
    precision = recall if precision is None else precision
    for name, value in (("recall", recall), ("precision", precision)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    for name, value in (("cache_hit", cache_hit), ("cache_occupancy", cache_occupancy)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if predictor_fraction < 0:
        raise ValueError(f"predictor_fraction must be ≥ 0, got {predictor_fraction}")
    true_pos = recall * (1.0 - s)
    false_pos = true_pos * (1.0 / precision - 1.0)
    return true_pos * (1.0 - cache_hit) + false_pos * (1.0 - cache_occupancy) + predictor_fraction


def _spread(per_layer: list[list[float]]) -> dict[str, list]:
    """Mean over layers, min and max and the layers where they occur, per cache size."""
    cols = list(zip(*per_layer))
    return {
        "mean": [sum(c) / len(c) for c in cols],
        "min": [min(c) for c in cols],
        "max": [max(c) for c in cols],
        "min_layer": [c.index(min(c)) for c in cols],
        "max_layer": [c.index(max(c)) for c in cols],
        "per_layer": per_layer,
    }


def analyse(
    model: nn.Module,
    windows: torch.LongTensor,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    cache_sizes: Sequence[int] = DEFAULT_CACHE_SIZES,
    recalls: Sequence[float] = DEFAULT_RECALLS,
    *,
    same_positions: bool = True,
    progress: bool = True,
) -> dict:
    """The whole prefetch study on ``windows`` ([n, seq_len] tokens); a JSON-serialisable dict.

    One dense forward per window feeds every sparsity; reuse is accumulated window by window, so no
    mask outlives its window. Per sparsity (key ``f"{s:g}"``): hit rate and occupancy per layer and k
    with mean/min/max over layers, the chance hit rate ``1 − s^k`` of independent random sets of the
    same size (the baseline reuse must beat), and the traffic fraction of `traffic_with_predictor` per
    recall, without cache (``k = 0``) and with each k.
    """
    from tqdm.auto import tqdm

    windows = _check_windows(windows)
    sizes = _check_cache_sizes(cache_sizes, windows.shape[1])
    sparsities = [float(s) for s in sparsities]
    if not sparsities or not recalls:
        raise ValueError("analyse needs at least one sparsity and one recall")
    sites = ffn_sites(model)
    inter = sites[0].intermediate_size
    # running totals sums[sparsity][layer]: [4, len(sizes)] from `_reuse_sums`
    sums = [[torch.zeros(4, len(sizes), dtype=torch.float64) for _ in sites] for _ in sparsities]
    it = _iter_window_masks(model, windows, sparsities)
    for masks in tqdm(it, total=len(windows), desc="prefetch analysis", disable=not progress, leave=False):
        for j in range(len(sparsities)):
            for layer, m in enumerate(masks[j]):
                sums[j][layer] += _reuse_sums(m, sizes, same_positions)

    result: dict = {
        "num_windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "num_layers": len(sites),
        "intermediate_size": inter,
        "cache_sizes": sizes,
        "positions": f"n ≥ {sizes[-1]} in every window" if same_positions else "n ≥ k in every window",
        "recalls": [float(r) for r in recalls],
        "sparsities": {},
    }
    for j, s in enumerate(sparsities):
        means = _means(sums[j])
        hit_pl, occ_pl = means["hit_rate"], means["occupancy"]
        traffic = {}
        for r in recalls:
            # k = 0 first (no cache), then each cache size; per layer, then spread over layers
            per_layer = [[traffic_with_predictor(s, r)]
                         + [traffic_with_predictor(s, r, h, o) for h, o in zip(hit_pl[layer], occ_pl[layer])]
                         for layer in range(len(sites))]
            traffic[f"{r:g}"] = _spread(per_layer)
        result["sparsities"][f"{s:g}"] = {
            "n_keep": keep_count(inter, s),
            "hit_rate": _spread(hit_pl),
            "occupancy": _spread(occ_pl),
            "chance_hit_rate": [1.0 - s**k for k in sizes],
            "traffic": traffic,  # index 0 is k = 0 (no cache), then cache_sizes
        }
    return result


def save_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return path


def summary_table(result: dict, ks: Sequence[int] = (1, 4, 16)) -> str:
    """Markdown table: hit rate (mean over layers, min–max layer), occupancy and traffic per sparsity."""
    sizes = result["cache_sizes"]
    ks = [k for k in ks if k in sizes]
    recalls = result["recalls"]
    head = ["sparsity"] + [f"hit k={k} mean [min–max]" for k in ks] + [f"occupancy k={k}" for k in ks]
    head += [f"traffic r={r:g} k=0" for r in recalls] + [f"traffic r={r:g} k={ks[-1]}" for r in recalls]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s, d in result["sparsities"].items():
        h, o = d["hit_rate"], d["occupancy"]
        row = [s]
        row += [f"{h['mean'][sizes.index(k)]:.3f} [{h['min'][sizes.index(k)]:.3f}–{h['max'][sizes.index(k)]:.3f}]"
                for k in ks]
        row += [f"{o['mean'][sizes.index(k)]:.3f}" for k in ks]
        row += [f"{d['traffic'][f'{r:g}']['mean'][0]:.3f}" for r in recalls]
        row += [f"{d['traffic'][f'{r:g}']['mean'][1 + sizes.index(ks[-1])]:.3f}" for r in recalls]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_reuse(result: dict, path: str | Path) -> Path:
    """One PNG, three panels, one colour per sparsity: hit rate vs cache size k (mean over layers,
    min–max band, dotted: independent random sets ``1 − s^k``); hit rate vs cache occupancy (the
    diagonal is a random cache of the same size); traffic fraction vs k (k = 0: no cache; solid: the
    best recall in the result with min–max band, dashed: the worst)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    sizes = result["cache_sizes"]
    recalls = result["recalls"]
    # the best and the worst recall are enough to read the trend; solid = best
    shown = [(max(recalls), "-")] + ([(min(recalls), "--")] if min(recalls) < max(recalls) else [])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = list(range(len(sizes)))
    for s, d in result["sparsities"].items():
        h = d["hit_rate"]
        (line,) = axes[0].plot(x, h["mean"], marker="o", label=f"s={s}")
        axes[0].fill_between(x, h["min"], h["max"], color=line.get_color(), alpha=0.15)
        axes[0].plot(x, d["chance_hit_rate"], ls=":", color=line.get_color())
        # hit rate against the memory the cache holds: a static cache of random neurons of the same
        # size would sit on the diagonal, so the height above it is what recency buys
        o = d["occupancy"]
        axes[1].plot(o["mean"], h["mean"], marker="o", color=line.get_color(), label=f"s={s}")
        labelled = float(s) == max(float(v) for v in result["sparsities"])  # the most spread-out curve
        for k, ox, hy in zip(sizes, o["mean"], h["mean"]) if labelled else ():
            axes[1].annotate(f"k={k}", (ox, hy), textcoords="offset points", xytext=(4, -10), fontsize=6)
        for r, ls in shown:
            t = d["traffic"][f"{r:g}"]
            axes[2].plot([0] + [i + 1 for i in x], t["mean"], ls=ls, marker="o", color=line.get_color(),
                         label=f"s={s}, recall {r:g}")
            if ls == "-":
                axes[2].fill_between([0] + [i + 1 for i in x], t["min"], t["max"], color=line.get_color(), alpha=0.12)
    axes[0].set(title="hit rate of a k-token neuron cache\n(band: min–max layer; dotted: random sets)",
                xlabel="cache size k (tokens)", ylabel="|A_n ∩ cache| / |A_n|", ylim=(0, 1.02))
    axes[1].plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="random cache of the same size")
    axes[1].set(title="hit rate vs memory the cache holds (mean over layers)",
                xlabel="cache occupancy |A_{n-1} ∪ … ∪ A_{n-k}| / I", ylabel="hit rate", xlim=(0, 1.02),
                ylim=(0, 1.02))
    axes[2].set(title="FFN bytes fetched per token (dense = 1)", xlabel="cache size k (tokens; 0 = no cache)",
                ylabel="fraction of dense FFN weight bytes", ylim=(0, None))
    axes[0].set_xticks(x, [str(k) for k in sizes])
    axes[2].set_xticks([0] + [i + 1 for i in x], ["0"] + [str(k) for k in sizes])
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Active-neuron reuse and prefetch traffic ({result['num_windows']}×{result['seq_len']} tokens, "
                 f"{result['num_layers']} layers)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
