"""Per-layer thresholds from score statistics on calibration text.

Calibration runs the *dense* model over calibration windows with each FFN replaced by a sparse module
whose method is `CollectScores` and whose mask rule is a `ScoreRecorder`: the module computes exactly
the scores the methods will later mask on, records a random subsample of them, and masks nothing.

Each recorder keeps two subsamples per site and forward: single (token, neuron) scores, and whole
token rows (every neuron's score for a few tokens). The threshold for target sparsity ``s`` follows the
spec's ``threshold_rule``:

* ``"pooled"``: the ``s``-quantile of the layer's pooled single scores, so on text like the calibration
  text a fraction ``s`` of (token, neuron) entries fall below it (as Dhar et al. calibrate);
* ``"mean-kth"``: per token row the k-th smallest score (``k = int(D*s)``, the official top-k's
  cut-off), averaged over the rows of each forward, then over forwards. This is the official
  COUNTDOWN threshold (``whitening_by_ratio`` returns ``threshold.mean()`` per forward;
  ``load_predictor`` takes ``groupby('layer').mean()`` over forwards, ``+ adjust_threshold``);
* ``"median-kth"``: the same with the median over forwards (the official ``--threshold_agg median``).

``threshold_adjust`` is added to every threshold. One collection serves every target sparsity and rule.

Methods whose score uses a per-neuron constant measured on calibration text (``Method.stats``: CHESS's
E|up_i|) get one more pass first, through `CollectStats` and a `MeanRecorder`; the means ride along in
the `Calibration` (``stats``) and are installed as module buffers for the score pass and afterwards.

With attention sites, the same pass records |input| of every layer's q/k/v and o projections
(`countdown.attention`): a `Calibration` named "attention" with the sites ("qkv", "o").
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ffn
from .methods import CollectScores, CollectStats, Method, keep_count
from .models import ATTENTION_SITES, AttentionSite, FFNSite, fingerprint
from .spec import THRESHOLD_RULES, SparsitySpec

# torch.quantile refuses inputs above 2**24 elements
_MAX_QUANTILE_SAMPLES = 1 << 24


@dataclass
class Calibration:
    """Score samples of one method on one model: ``samples[layer][site]`` is a 1-D float tensor of
    single scores; ``rows[layer][site]`` a [n, D] tensor of whole token rows and
    ``row_forwards[layer][site]`` [n] the calibration forward each row came from."""

    method: str
    fingerprint: dict
    sites: tuple[str, ...]
    samples: list[dict[str, torch.Tensor]] = field(repr=False)
    windows: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    # per layer {name: [I] float32} for the method's `stats` (empty when it has none)
    stats: list[dict[str, torch.Tensor]] = field(repr=False, default_factory=list)
    rows: list[dict[str, torch.Tensor]] = field(repr=False, default_factory=list)
    row_forwards: list[dict[str, torch.Tensor]] = field(repr=False, default_factory=list)

    def thresholds(self, sparsity: float | Sequence[Sequence[float]], rule: str = "pooled", adjust: float = 0.0,
                   count_rule: str = "floor") -> torch.Tensor:
        """[num_layers, num_sites] thresholds for ``sparsity`` under ``rule`` (see the module docstring):
        one target for every layer and site, or a [num_layers][num_sites] table of targets
        (`countdown.Allocation.table`), each (layer, site) calibrated to its own."""
        out = torch.empty(len(self.samples), len(self.sites), dtype=torch.float32)
        for i, layer in enumerate(self.samples):
            for j, site in enumerate(self.sites):
                rows = self.rows[i].get(site) if self.rows else None
                forwards = self.row_forwards[i].get(site) if self.row_forwards else None
                out[i, j] = site_threshold(layer[site], rows, forwards, target_at(sparsity, i, j), rule, adjust,
                                           count_rule)
        return out


def target_at(sparsity: float | Sequence[Sequence[float]], layer: int, site: int) -> float:
    """The target of (layer, site): the one number, or its entry of a [layers][sites] table."""
    return sparsity if isinstance(sparsity, (int, float)) else sparsity[layer][site]


def site_threshold(values: torch.Tensor, rows: torch.Tensor | None, forwards: torch.Tensor | None,
                   sparsity: float, rule: str = "pooled", adjust: float = 0.0, count_rule: str = "floor") -> float:
    """One site's threshold: the pooled quantile of ``values`` (1-D), or the mean/median over forwards
    of each forward's mean per-row k-th smallest score in ``rows`` ([n, D], forward ids ``forwards``)."""
    if rule == "pooled":
        return quantile(values, sparsity) + adjust
    if rule not in ("mean-kth", "median-kth"):
        raise ValueError(f"threshold_rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    if rows is None or rows.numel() == 0:
        raise ValueError(f"threshold_rule={rule!r} needs whole token rows of calibration scores; this "
                         "calibration kept none (ScoreRecorder.samples_per_call too small?): calibrate again")
    per_forward = per_forward_kth(rows, forwards, sparsity, count_rule)
    centre = per_forward.mean() if rule == "mean-kth" else per_forward.median()
    return float(centre) + adjust


def per_forward_kth(rows: torch.Tensor, forwards: torch.Tensor | None, sparsity: float,
                    count_rule: str = "floor") -> torch.Tensor:
    """Mean over each forward's rows of the per-row k-th smallest score, ``k = D - keep_count(D, s)``
    (the official top-k's cut-off): [n_forwards] float64, forwards in order of first appearance."""
    width = rows.shape[-1]
    k = width - keep_count(width, sparsity, count_rule)
    if k == 0:  # nothing is dropped: a threshold below every score
        kth = rows.float().min(dim=-1).values - 1.0
    else:
        kth = rows.float().kthvalue(k, dim=-1).values
    if forwards is None:
        forwards = torch.zeros(rows.shape[0], dtype=torch.long)
    ids, inverse = torch.unique(forwards, return_inverse=True)
    sums = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, kth.double())
    counts = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(kth, dtype=torch.float64))
    return sums / counts


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

    ``forward(site, score [..., D]) -> ones``. Per site: ``samples[site]``, a list of 1-D float32 CPU
    tensors of single scores; ``rows[site]``, a list of [n, D] CPU tensors of whole token rows (in the
    score's dtype when that is 16-bit: exact, half the memory); ``row_forwards[site]``, for each row
    the index of the call it came from (one call per forward of the model)."""

    # samples of the score kept per call: enough for a stable quantile, bounded memory. The same
    # budget again goes to whole rows: max(1, samples_per_call // D) token rows per call.
    samples_per_call = 1 << 16

    def __init__(self) -> None:
        super().__init__()
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.row_forwards: dict[str, list[torch.Tensor]] = {}
        # one generator per site (and per kind of sample), seeded by its name: a method's calibration
        # subsample is the same whichever other methods are calibrated in the same pass
        self._rngs: dict[str, torch.Generator] = {}

    def _rng(self, key: str) -> torch.Generator:
        rng = self._rngs.get(key)
        if rng is None:
            rng = self._rngs[key] = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        return rng

    def forward(self, site: str, score: torch.Tensor) -> torch.Tensor:
        flat = score.detach().reshape(-1).float()
        if flat.numel() > self.samples_per_call:
            idx = torch.randint(flat.numel(), (self.samples_per_call,), generator=self._rng(site))
            flat = flat[idx.to(flat.device)]
        self.samples.setdefault(site, []).append(flat.cpu())
        self._record_rows(site, score.detach())
        return torch.ones_like(score)

    def _record_rows(self, site: str, score: torch.Tensor) -> None:
        rows = score.reshape(-1, score.shape[-1])
        if not self.samples_per_call:
            return
        budget = max(1, self.samples_per_call // rows.shape[-1])
        if rows.shape[0] > budget:
            idx = torch.randperm(rows.shape[0], generator=self._rng(site + "#rows"))[:budget]
            rows = rows[idx.to(rows.device)]
        if rows.dtype not in (torch.float16, torch.bfloat16):
            rows = rows.float()
        call = len(self.row_forwards.get(site, []))
        self.rows.setdefault(site, []).append(rows.cpu())
        self.row_forwards.setdefault(site, []).append(torch.full((rows.shape[0],), call, dtype=torch.long))

    def gathered(self, site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(single scores [m], token rows [n, D], the forward of each row [n]) recorded at ``site``."""
        rows = self.rows.get(site)
        if not rows:
            return torch.cat(self.samples[site]), torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
        return torch.cat(self.samples[site]), torch.cat(rows), torch.cat(self.row_forwards[site])


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
        samples, rows, forwards = [], [], []
        for r in recorders:
            got = {site: r.gathered(f"{m.name}:{site}") for site in m.sites}
            samples.append({site: g[0] for site, g in got.items()})
            rows.append({site: g[1] for site, g in got.items()})
            forwards.append({site: g[2] for site, g in got.items()})
        own = [{name: layer[name] for name in m.stats} for layer in stats] if m.stats else []
        out[m.name] = Calibration(m.name, fp, m.sites, samples, windows, stats=own, rows=rows, row_forwards=forwards)
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
    spec: SparsitySpec,
    predictors: list[dict[str, torch.Tensor]] | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> torch.Tensor:
    """Thresholds for a method with several sites in one FFN (TEAL: input, then coefficient).

    Masking the input shrinks the coefficient, so a coefficient threshold taken from the dense
    model would skip far more than asked. Each later site is therefore re-calibrated on calibration
    text with the earlier sites already masked at their thresholds.
    """
    targets = spec.targets()  # one number, or [layers][sites] of an allocation
    thresholds = cal.thresholds(targets, spec.threshold_rule, spec.threshold_adjust, spec.count_rule)
    for k in range(1, len(method.sites)):
        site = method.sites[k]
        recorders = [ScoreRecorder() for _ in sites]
        rules = [_MaskThenRecord(ffn.Masker(spec, thresholds[i]), recorders[i], set(method.sites[k:]))
                 for i in range(len(sites))]
        _forward_all(model, sites, method, rules, predictors, cal.windows, batch_size, progress, cal.stats or None)
        for i, r in enumerate(recorders):
            thresholds[i, k] = site_threshold(*r.gathered(site), target_at(targets, i, k), spec.threshold_rule,
                                              spec.threshold_adjust, spec.count_rule)
    return thresholds
