"""Per-layer thresholds from score statistics on calibration text.

Calibration runs the *dense* model over calibration windows with each FFN replaced by a sparse module
whose method is `CollectScores` and whose mask rule is a `ScoreRecorder`: the module computes exactly
the scores the methods will later mask on, records a random subsample of them, and masks nothing. The
threshold for target sparsity ``s`` at a site is the ``s``-quantile of that layer's pooled scores, so
on text like the calibration text a fraction ``s`` of (token, neuron) entries fall below it. One
collection serves every target sparsity.

Methods whose score uses a per-neuron constant measured on calibration text (``Method.stats``: CHESS's
E|up_i|) get one more pass first, through `CollectStats` and a `MeanRecorder`; the means ride along in
the `Calibration` (``stats``) and are installed as module buffers for the score pass and afterwards.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ffn
from .methods import CollectScores, CollectStats, Method
from .models import ATTENTION_SITES, AttentionSite, FFNSite, fingerprint

# torch.quantile refuses inputs above 2**24 elements
_MAX_QUANTILE_SAMPLES = 1 << 24


@dataclass
class Calibration:
    """Score samples of one method on one model: ``samples[layer][site]`` is a 1-D float tensor."""

    method: str
    fingerprint: dict
    sites: tuple[str, ...]
    samples: list[dict[str, torch.Tensor]] = field(repr=False)
    windows: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    # per layer {name: [I] float32} for the method's `stats` (empty when it has none)
    stats: list[dict[str, torch.Tensor]] = field(repr=False, default_factory=list)

    def thresholds(self, sparsity: float) -> torch.Tensor:
        """[num_layers, num_sites] thresholds reaching ``sparsity`` on the calibration text."""
        rows = [[quantile(layer[site], sparsity) for site in self.sites] for layer in self.samples]
        return torch.tensor(rows, dtype=torch.float32).reshape(len(self.samples), len(self.sites))


def quantile(values: torch.Tensor, sparsity: float) -> float:
    """The ``sparsity``-quantile of ``values``; below every value at sparsity 0 (nothing skipped)."""
    if sparsity == 0:
        return float(values.min()) - 1.0
    if values.numel() > _MAX_QUANTILE_SAMPLES:
        keep = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:_MAX_QUANTILE_SAMPLES]
        values = values[keep]
    return float(torch.quantile(values, sparsity))


class ScoreRecorder(nn.Module):
    """A mask rule that masks nothing and records a random subsample of every score it sees.

    ``forward(site, score [..., I]) -> ones``; ``samples[site]`` is a list of 1-D float32 CPU tensors."""

    # samples of the score kept per call: enough for a stable quantile, bounded memory
    samples_per_call = 1 << 16

    def __init__(self) -> None:
        super().__init__()
        self.samples: dict[str, list[torch.Tensor]] = {}
        # one generator per site, seeded by its name: a method's calibration subsample is the same
        # whichever other methods are calibrated in the same pass
        self._rngs: dict[str, torch.Generator] = {}

    def forward(self, site: str, score: torch.Tensor) -> torch.Tensor:
        flat = score.detach().reshape(-1).float()
        if flat.numel() > self.samples_per_call:
            rng = self._rngs.get(site)
            if rng is None:
                rng = self._rngs[site] = torch.Generator().manual_seed(zlib.crc32(site.encode()))
            idx = torch.randint(flat.numel(), (self.samples_per_call,), generator=rng)
            flat = flat[idx.to(flat.device)]
        self.samples.setdefault(site, []).append(flat.cpu())
        return torch.ones_like(score)


class MeanRecorder(nn.Module):
    """A mask rule that masks nothing and averages what it is shown over tokens, per site.

    ``forward(site, value [..., I]) -> ones``; ``means()`` is {site: [I] float32 CPU tensor}."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def forward(self, site: str, value: torch.Tensor) -> torch.Tensor:
        rows = value.detach().reshape(-1, value.shape[-1])
        total = rows.sum(dim=0, dtype=torch.float64)
        self.sums[site] = self.sums[site] + total if site in self.sums else total
        self.counts[site] = self.counts.get(site, 0) + rows.shape[0]
        return torch.ones_like(value)

    def means(self) -> dict[str, torch.Tensor]:
        return {site: (total / self.counts[site]).float().cpu() for site, total in self.sums.items()}


class _MaskThenRecord(nn.Module):
    """Masks the sites already calibrated, records the ones being calibrated (TEAL's second pass)."""

    def __init__(self, masker: ffn.Masker, recorder: ScoreRecorder, recorded: set[str]):
        super().__init__()
        self.masker, self.recorder, self.recorded = masker, recorder, recorded

    def forward(self, site: str, score: torch.Tensor) -> torch.Tensor:
        return self.recorder(site, score) if site in self.recorded else self.masker(site, score)


def as_token_batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]


@torch.no_grad()
def collect_many(
    model: nn.Module,
    sites: list[FFNSite],
    methods: list[Method],
    windows: torch.Tensor,
    batch_size: int = 1,
    predictors: list[dict[str, torch.Tensor]] | None = None,
    progress: bool = True,
    attention: list[AttentionSite] | None = None,
) -> dict[str, Calibration]:
    """One pass over ``windows`` ([n, seq_len] token ids) collecting the scores of several methods;
    a `Calibration` each. Methods with per-neuron ``stats`` add one pass before it that measures them.
    With ``attention`` sites, the same pass records |input| of each layer's q/k/v and o projections:
    a `Calibration` named "attention" with the sites ("qkv", "o")."""
    stats = None
    if any(m.stats for m in methods):
        means = [MeanRecorder() for _ in sites]
        _forward_all(model, sites, CollectStats(methods), means, predictors, windows, batch_size, progress)
        stats = [r.means() for r in means]
    recorders = [ScoreRecorder() for _ in sites]
    attention_recorders = [ScoreRecorder() for _ in attention or []]
    handles = [projection.register_forward_pre_hook(_record_input(recorder, name))
               for site, recorder in zip(attention or [], attention_recorders)
               for projection, name in ((site.qkv[0], "qkv"), (site.o, "o"))]
    try:
        _forward_all(model, sites, CollectScores(methods), recorders, predictors, windows, batch_size, progress, stats)
    finally:
        for handle in handles:
            handle.remove()
    fp = fingerprint(model)
    out = {}
    if attention:
        samples = [{name: torch.cat(r.samples[name]) for name in ATTENTION_SITES} for r in attention_recorders]
        out["attention"] = Calibration("attention", fp, ATTENTION_SITES, samples, windows)
    for m in methods:
        samples = [{site: torch.cat(r.samples[f"{m.name}:{site}"]) for site in m.sites} for r in recorders]
        own = [{name: layer[name] for name in m.stats} for layer in stats] if m.stats else []
        out[m.name] = Calibration(m.name, fp, m.sites, samples, windows, own)
    return out


def _record_input(recorder: ScoreRecorder, site: str):
    def hook(module, args):
        recorder(site, args[0].abs())

    return hook


def _forward_all(model, sites, method, rules, predictors, windows, batch_size, progress, stats=None) -> None:
    ffn.install(model, sites, method, rules, predictors, stats=stats)
    device = next(model.parameters()).device
    try:
        for batch in tqdm(as_token_batches(windows, batch_size), desc="calibrate", disable=not progress, leave=False):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        ffn.remove(model)


@torch.no_grad()
def sequential_thresholds(
    model: nn.Module,
    sites: list[FFNSite],
    method: Method,
    cal: Calibration,
    spec: ffn.SparsitySpec,
    predictors: list[dict[str, torch.Tensor]] | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> torch.Tensor:
    """Thresholds for a method with several sites in one FFN (TEAL: input, then coefficient).

    Masking the input shrinks the coefficient, so a coefficient threshold taken from the dense
    model would skip far more than asked. Each later site is therefore re-calibrated on calibration
    text with the earlier sites already masked at their thresholds.
    """
    thresholds = cal.thresholds(spec.sparsity)
    for k in range(1, len(method.sites)):
        site = method.sites[k]
        recorders = [ScoreRecorder() for _ in sites]
        rules = [_MaskThenRecord(ffn.Masker(spec, thresholds[i]), recorders[i], set(method.sites[k:]))
                 for i in range(len(sites))]
        _forward_all(model, sites, method, rules, predictors, cal.windows, batch_size, progress, cal.stats or None)
        for i, r in enumerate(recorders):
            thresholds[i, k] = quantile(torch.cat(r.samples[site]), spec.sparsity)
    return thresholds
