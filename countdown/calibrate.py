"""Per-layer thresholds from score statistics on calibration text.

Calibration runs the *dense* model over calibration windows with each FFN replaced by the method's
sparse module in "collect" mode: the module computes exactly the scores it will later mask on, records
a random subsample of them, and masks nothing. The threshold for target sparsity ``s`` at a site is the
``s``-quantile of that layer's pooled scores, so on text like the calibration text a fraction ``s`` of
(token, neuron) entries fall below it. One collection serves every target sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ffn
from .methods import CollectScores, Method
from .models import FFNSite, fingerprint

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

    def thresholds(self, sparsity: float) -> torch.Tensor:
        """[num_layers, num_sites] thresholds reaching ``sparsity`` on the calibration text."""
        rows = [[self._quantile(layer[site], sparsity) for site in self.sites] for layer in self.samples]
        return torch.tensor(rows, dtype=torch.float32).reshape(len(self.samples), len(self.sites))

    @staticmethod
    def _quantile(values: torch.Tensor, sparsity: float) -> float:
        if sparsity == 0:
            return float(values.min()) - 1.0  # below every score: nothing is skipped
        if values.numel() > _MAX_QUANTILE_SAMPLES:
            keep = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:_MAX_QUANTILE_SAMPLES]
            values = values[keep]
        return float(torch.quantile(values, sparsity))


def as_token_batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]


@torch.no_grad()
def collect(
    model: nn.Module,
    sites: list[FFNSite],
    method: Method,
    windows: torch.Tensor,
    batch_size: int = 1,
    predictors: list[dict[str, torch.Tensor]] | None = None,
    progress: bool = True,
) -> Calibration:
    """Run ``windows`` ([n, seq_len] token ids) through the model and collect the method's scores."""
    return collect_many(model, sites, [method], windows, batch_size, predictors, progress)[method.name]


@torch.no_grad()
def collect_many(
    model: nn.Module,
    sites: list[FFNSite],
    methods: list[Method],
    windows: torch.Tensor,
    batch_size: int = 1,
    predictors: list[dict[str, torch.Tensor]] | None = None,
    progress: bool = True,
) -> dict[str, Calibration]:
    """One pass over ``windows`` collecting the scores of several methods; a `Calibration` each."""
    collector = CollectScores(methods)
    maskers = [ffn.Masker(collector.sites, 0.0, "collect", None) for _ in sites]
    _forward_all(model, sites, collector, maskers, predictors, windows, batch_size, progress)
    fp = fingerprint(model)
    out = {}
    for m in methods:
        samples = [{site: torch.cat(mk.collected[f"{m.name}:{site}"]) for site in m.sites} for mk in maskers]
        out[m.name] = Calibration(m.name, fp, m.sites, samples, windows)
    return out


def _forward_all(model, sites, method, maskers, predictors, windows, batch_size, progress) -> None:
    ffn.install(model, sites, method, maskers, predictors)
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
    sparsity: float,
    predictors: list[dict[str, torch.Tensor]] | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> torch.Tensor:
    """Thresholds for a method with several sites in one FFN (TEAL: input, then coefficient).

    Masking the input shrinks the coefficient, so a coefficient threshold taken from the dense
    model would skip far more than asked. Each later site is therefore re-calibrated on calibration
    text with the earlier sites already masked at their thresholds.
    """
    thresholds = cal.thresholds(sparsity)
    for k in range(1, len(method.sites)):
        site = method.sites[k]
        maskers = [ffn.Masker(method.sites, sparsity, "threshold", thresholds[i]) for i in range(len(sites))]
        for m in maskers:
            m.collect_sites = set(method.sites[k:])
        _forward_all(model, sites, method, maskers, predictors, cal.windows, batch_size, progress)
        for i, m in enumerate(maskers):
            thresholds[i, k] = Calibration._quantile(torch.cat(m.collected[site]), sparsity)
    return thresholds
