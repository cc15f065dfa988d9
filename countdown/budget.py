"""Where to spend a sparsity budget: bytes read per token, and the searches that allocate them.

The currency is the weight bytes one decode step reads, as a fraction of the dense step's
(`ByteModel`: every weight once, the FFNs at the method's `Method.ffn_bytes_read`, the attention
projections minus their skipped input rows; the KV cache is left out, it depends on the context).
A search returns the `countdown.Allocation` that reads a given number of bytes:

* `greedy_allocation` is TEAL's block-wise greedy (``teal/greedyopt.py``): every block keeps the bytes
  the uniform allocation gives it; inside a block, step by step, the site whose next step (the same
  bytes for every site) raises the block-output error least takes it. One site per block (CATS,
  M-COUNTDOWN, CHESS without attention) leaves it nothing to choose: it is the uniform allocation.
* `sensitivity_allocation` (ours) measures on calibration text the end-to-end loss of every
  (layer, site) alone at a grid of sparsities (KL of the sparse model's next-token distribution to the
  dense one's; `sensitivity_profile`), then spends the bytes where they cost least: a greedy knapsack
  over each curve's lower convex hull, by marginal ΔKL per byte saved, ending exactly on the budget.

Both are cheap enough for a CPU: the dense input of every decoder layer is captured once, a greedy
trial runs one block, and a sensitivity point runs the layers from the one it perturbs upward (the
layers below return their captured dense outputs). Thresholds come from the dense calibration scores'
pooled quantiles (as TEAL's histograms); `countdown.sparsify` then calibrates the final allocation
properly. Everything is deterministic (no sampling; calibration subsamples are seeded).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from . import attention as attention_mod
from . import ffn
from .allocation import ATTENTION_SITES, Allocation
from .api import calibrate_methods, sparsify, unsparsify
from .methods import Method, get_method
from .models import attention_sites, decoder_layers, ffn_sites, step_weight_bytes

SEARCHES = ("uniform", "greedy", "sensitivity")
DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class ByteModel:
    """Bytes of one decode step under an allocation: ``dense`` bytes minus, per (layer, site), ``rate``
    bytes per unit of sparsity, plus ``overhead`` (a method's extra reads, e.g. R-Sparse's factors)."""

    dense: float
    sites: tuple[str, ...]
    rate: tuple[tuple[float, ...], ...]  # [layer][site]: bytes saved per unit sparsity
    overhead: float = 0.0

    def saved(self, allocation: Allocation) -> float:
        table = allocation.table(self.sites, len(self.rate))
        return sum(r * s for rates, row in zip(self.rate, table) for r, s in zip(rates, row))

    def fraction(self, allocation: Allocation) -> float:
        """Bytes read per decode step as a fraction of the dense step's."""
        return (self.dense + self.overhead - self.saved(allocation)) / self.dense

    def measured_fraction(self, skipped: dict[str, float]) -> float:
        """`fraction` at measured skipped fractions per site, each the mean over layers (as
        `countdown.PerplexityResult.site_sparsity` and ``attention_sparsity`` give them; exact where
        every layer has the same size)."""
        saved = sum(sum(rates[j] for rates in self.rate) * skipped.get(site, 0.0) for j, site in enumerate(self.sites))
        return (self.dense + self.overhead - saved) / self.dense

    def saved_for(self, fraction: float) -> float:
        """Bytes to save for a step reading ``fraction`` of the dense step's."""
        return self.dense + self.overhead - fraction * self.dense

    def uniform(self, fraction: float) -> Allocation:
        """Every (layer, site) at the one sparsity that reads ``fraction`` of the dense bytes."""
        total = sum(sum(rates) for rates in self.rate)
        s = self.saved_for(fraction) / total
        lowest = (self.dense + self.overhead - 0.99 * total) / self.dense
        if not 0.0 <= s < 0.99:
            raise ValueError(f"a step reading {fraction:.3f} of the dense bytes is out of reach for these sites "
                             f"(from {min(1.0, (self.dense + self.overhead) / self.dense):.3f} down to {lowest:.3f})")
        return Allocation.uniform(s, len(self.rate), self.sites)

    def uniform_at(self, sparsity: float) -> Allocation:
        return Allocation.uniform(sparsity, len(self.rate), self.sites)


def byte_model(model: nn.Module, method: str | Method, attention: bool = False) -> ByteModel:
    """The `ByteModel` of ``method`` on ``model`` (with the attention sites "qkv" and "o" if ``attention``).

    An FFN site's rate is linear in its sparsity: ``ffn_bytes_read`` at sparsity 0 minus at 1 on that
    site alone, times the layer's FFN weight bytes (exact for every method but Dhar's, whose down
    column is skipped where either of two masks is, estimated here as if they were one)."""
    m = get_method(method) if isinstance(method, str) else method
    dense = step_weight_bytes(model)
    fsites = ffn_sites(model)
    asites = attention_sites(model) if attention else []
    sites = m.sites + (ATTENTION_SITES if attention else ())
    rates, overhead = [], 0.0
    for i, site in enumerate(fsites):
        layer_bytes = sum(_nbytes(mod.weight) for mod in site.modules.values())
        zero = {s: 0.0 for s in m.sites}
        base = m.ffn_bytes_read(site.kind, zero)
        overhead += layer_bytes * (base - 1.0)
        row = [layer_bytes * (base - m.ffn_bytes_read(site.kind, {**zero, s: 1.0})) for s in m.sites]
        if attention:
            a = asites[i]
            row += [float(sum(_nbytes(p.weight) for p in a.qkv)), float(_nbytes(a.o.weight))]
        rates.append(tuple(row))
    return ByteModel(float(dense), sites, tuple(rates), overhead)


# -- measuring: the model installed at sparsity 0, thresholds set per (layer, site) ----------------------


class _Probe:
    """The method installed on every layer with nothing skipped (positions "all", reference path), the
    dense scores' sorted calibration samples to turn a sparsity into a threshold, and every decoder
    layer's captured dense inputs and outputs on ``windows``."""

    def __init__(self, model: nn.Module, method: Method, windows: torch.Tensor, attention: bool, progress: bool):
        self.model, self.method, self.windows = model, method, windows
        cals = calibrate_methods(model, [method.name], windows, max_windows=None, progress=progress,
                                 attention=attention)
        self.sites = method.sites + (ATTENTION_SITES if attention else ())
        self.sorted: list[dict[str, torch.Tensor]] = []
        for i in range(len(ffn_sites(model))):
            layer = {s: cals[method.name].samples[i][s] for s in method.sites}
            if attention:
                layer.update({s: cals["attention"].samples[i][s] for s in ATTENTION_SITES})
            self.sorted.append({s: v.float().sort().values for s, v in layer.items()})
        cal = cals.get(method.name) if not attention else windows
        sparsify(model, method.name, 0.0, calibration=cal, attention=0.0 if attention else None, positions="all",
                 kernels="off", progress=progress, max_windows=None)
        self.modules = ffn.sparse_modules(model)
        self.projections: dict[tuple[int, str], list] = {}
        for p in attention_mod.sparse_projections(model):
            self.projections.setdefault((p.layer_idx, p.site), []).append(p)
        self.layers = decoder_layers(model)
        self.inputs: list[tuple[tuple, dict]] = []
        self.outputs: list = []
        self._capture()

    def close(self) -> None:
        unsparsify(self.model)

    @torch.no_grad()
    def _capture(self) -> None:
        inputs: dict[int, tuple] = {}
        outputs: dict[int, object] = {}
        hooks = []
        for i, layer in enumerate(self.layers):
            hooks.append(layer.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: inputs.__setitem__(i, (args, dict(kwargs))), with_kwargs=True))
            hooks.append(layer.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out)))
        try:
            device = next(self.model.parameters()).device
            self.dense_logits = self.model(input_ids=self.windows.to(device), use_cache=False).logits.float()
        finally:
            for h in hooks:
                h.remove()
        self.inputs = [inputs[i] for i in range(len(self.layers))]
        self.outputs = [outputs[i] for i in range(len(self.layers))]

    def threshold(self, layer: int, site: str, sparsity: float) -> float:
        """The pooled ``sparsity``-quantile of the site's dense calibration scores (below all at 0)."""
        values = self.sorted[layer][site]
        if sparsity <= 0:
            return float(values[0]) - 1.0
        pos = sparsity * (values.numel() - 1)
        lo = int(pos)
        hi = min(lo + 1, values.numel() - 1)
        return float(values[lo] + (values[hi] - values[lo]) * (pos - lo))

    def set(self, layer: int, site: str, sparsity: float) -> None:
        thr = self.threshold(layer, site, sparsity)
        if site in self.method.sites:
            module = self.modules[layer]
            module.masker.thresholds[self.method.sites.index(site)] = thr
        else:
            for p in self.projections[(layer, site)]:
                p.sparse_threshold.fill_(thr)

    def set_layer(self, layer: int, values: dict[str, float]) -> None:
        for site, s in values.items():
            self.set(layer, site, s)

    @torch.no_grad()
    def block_output(self, layer: int) -> torch.Tensor:
        args, kwargs = self.inputs[layer]
        return _hidden(self.layers[layer](*args, **kwargs))

    @torch.no_grad()
    def kl_from(self, layer: int) -> float:
        """Mean per-token KL(dense ‖ current) of the next-token distributions, running only the layers
        from ``layer`` up (those below return their captured dense outputs)."""
        with _replay(self.layers[:layer], self.outputs[:layer]):
            device = next(self.model.parameters()).device
            logits = self.model(input_ids=self.windows.to(device), use_cache=False).logits.float()
        dense = F.log_softmax(self.dense_logits, dim=-1)
        sparse = F.log_softmax(logits, dim=-1)
        return float((dense.exp() * (dense - sparse)).sum(-1).mean())


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def _replay(layers: Sequence[nn.Module], outputs: Sequence[object]):
    """Each of ``layers`` returns its captured output instead of computing it (an instance ``forward``)."""
    try:
        for layer, out in zip(layers, outputs):
            layer.forward = lambda *a, _out=out, **k: _out
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


# -- the searches ------------------------------------------------------------------------------------


def greedy_allocation(model: nn.Module, method: str, fraction: float, windows: torch.Tensor, *,
                      attention: bool = False, step: float = 0.01, progress: bool = False) -> Allocation:
    """TEAL's block-wise greedy for a step reading ``fraction`` of the dense bytes (see the module
    docstring). Each block saves what the uniform allocation of the same bytes saves there; every greedy
    step saves ``step`` of the block's sparsifiable bytes at the site whose step raises the block
    output's squared error (relative to the dense output's) least; the last step is cut back so the
    block lands exactly on its bytes. ``windows``: [n, T] calibration token ids."""
    m = get_method(method)
    bm = byte_model(model, m, attention)
    uniform = bm.uniform(fraction)
    if len(bm.sites) == 1:
        return uniform  # one site per block: nothing to choose
    probe = _Probe(model, m, windows, attention, progress)
    try:
        values = []
        for layer, rates in enumerate(bm.rate):
            values.append(_greedy_block(probe, layer, bm.sites, rates, uniform.values[layer], step))
    finally:
        probe.close()
    return Allocation({site: [row[j] for row in values] for j, site in enumerate(bm.sites)})


def _greedy_block(probe: _Probe, layer: int, sites: tuple[str, ...], rates: Sequence[float],
                  uniform_row: Sequence[float], step: float) -> list[float]:
    target = probe.outputs[layer]
    target = _hidden(target).float()
    scale = float(target.square().sum(-1).mean())
    budget = sum(r * s for r, s in zip(rates, uniform_row))
    total = sum(rates)
    current = {s: 0.0 for s in sites}
    saved, last = 0.0, None
    cap = 0.95
    while saved < budget - 1e-9:
        best, best_err = None, float("inf")
        for site, rate in zip(sites, rates):
            if rate <= 0 or current[site] >= cap:
                continue
            trial = min(cap, current[site] + step * total / rate)
            probe.set(layer, site, trial)
            err = float((probe.block_output(layer).float() - target).square().sum(-1).mean()) / scale
            probe.set(layer, site, current[site])
            if err < best_err:
                best, best_err = site, err
        if best is None:
            break
        rate = rates[sites.index(best)]
        new = min(cap, current[best] + step * total / rate)
        saved += (new - current[best]) * rate
        current[best], last = new, best
        probe.set(layer, best, new)
    if last is not None and saved > budget:  # cut the last step back: exactly the block's bytes
        rate = rates[sites.index(last)]
        current[last] -= (saved - budget) / rate
    probe.set_layer(layer, {s: 0.0 for s in sites})  # the next block is searched on a dense model
    return [current[s] for s in sites]


@dataclass(frozen=True)
class Profile:
    """KL(dense ‖ sparse) per token with one (layer, site) at each ``grid`` sparsity, every other dense:
    ``kl[layer][site][g]``."""

    sites: tuple[str, ...]
    grid: tuple[float, ...]
    kl: tuple[tuple[tuple[float, ...], ...], ...]


def sensitivity_profile(model: nn.Module, method: str, windows: torch.Tensor, *, attention: bool = False,
                        grid: Sequence[float] = DEFAULT_GRID, progress: bool = False) -> Profile:
    """Measure the `Profile` on calibration ``windows`` ([n, T] token ids): one forward of the layers
    from l up per (layer l, site, grid point). One profile serves every byte budget."""
    m = get_method(method)
    grid = tuple(sorted(float(g) for g in grid))
    if not grid or grid[0] <= 0 or grid[-1] >= 1:
        raise ValueError(f"the sensitivity grid needs sparsities in (0, 1), got {grid}")
    probe = _Probe(model, m, windows, attention, progress)
    try:
        kl = []
        for layer in range(len(probe.layers)):
            row = []
            for site in probe.sites:
                curve = []
                for g in grid:
                    probe.set(layer, site, g)
                    curve.append(probe.kl_from(layer))
                probe.set(layer, site, 0.0)
                row.append(tuple(curve))
            kl.append(tuple(row))
            if progress:
                print(f"sensitivity: layer {layer} done", flush=True)
    finally:
        probe.close()
    return Profile(probe.sites, grid, tuple(kl))


def knapsack_allocation(profile: Profile, bytes_model: ByteModel, fraction: float) -> Allocation:
    """Spend the bytes to save for ``fraction`` where the profile says they cost the least KL: every
    (layer, site) curve (0 at sparsity 0, made non-decreasing) is replaced by its lower convex hull in
    (bytes saved, KL); hull segments are taken in order of KL per byte, and the last one only in part,
    so the allocation reads exactly ``fraction`` of the dense bytes."""
    if profile.sites != bytes_model.sites:
        raise ValueError(f"profile sites {profile.sites} differ from the byte model's {bytes_model.sites}")
    need = bytes_model.saved_for(fraction)
    bytes_model.uniform(fraction)  # the same reachability check and error
    segments = []  # (slope, layer, site index, from sparsity, to sparsity, bytes of the segment)
    for layer, (rates, curves) in enumerate(zip(bytes_model.rate, profile.kl)):
        for j, (rate, curve) in enumerate(zip(rates, curves)):
            if rate <= 0:
                continue
            xs, ys, running = [0.0], [0.0], 0.0
            for g, v in zip(profile.grid, curve):
                running = max(running, v)
                xs.append(g)
                ys.append(running)
            for a, b in _lower_hull(xs, ys):
                segments.append(((ys[b] - ys[a]) / ((xs[b] - xs[a]) * rate), layer, j, xs[a], xs[b], (xs[b] - xs[a]) * rate))
    segments.sort(key=lambda s: (s[0], s[1], s[2], s[3]))
    values = [[0.0] * len(profile.sites) for _ in bytes_model.rate]
    saved = 0.0
    for slope, layer, j, lo, hi, size in segments:
        if saved >= need - 1e-9:
            break
        take = min(size, need - saved)
        values[layer][j] = lo + (hi - lo) * take / size
        saved += take
    if saved < need - 1e-6 * need:
        raise ValueError(f"the profile's grid (up to {profile.grid[-1]:.0%}) cannot save the bytes for {fraction:.3f}")
    return Allocation({site: [row[j] for row in values] for j, site in enumerate(profile.sites)})


def _lower_hull(xs: Sequence[float], ys: Sequence[float]) -> list[tuple[int, int]]:
    """Segments (index pairs) of the lower convex hull of the points, left to right (xs increasing)."""
    hull: list[int] = []
    for i in range(len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the line from a to i
            if (ys[b] - ys[a]) * (xs[i] - xs[a]) >= (ys[i] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return list(pairwise(hull))


def sensitivity_allocation(model: nn.Module, method: str, fraction: float, windows: torch.Tensor, *,
                           attention: bool = False, grid: Sequence[float] = DEFAULT_GRID,
                           progress: bool = False) -> Allocation:
    """`sensitivity_profile`, then `knapsack_allocation` for ``fraction`` of the dense bytes."""
    profile = sensitivity_profile(model, method, windows, attention=attention, grid=grid, progress=progress)
    return knapsack_allocation(profile, byte_model(model, method, attention), fraction)


def search(model: nn.Module, method: str, fraction: float, windows: torch.Tensor, how: str = "sensitivity", *,
           attention: bool = False, progress: bool = False) -> Allocation:
    """The allocation of ``how`` ("uniform", "greedy" or "sensitivity") reading ``fraction`` of the dense bytes."""
    if how == "uniform":
        return byte_model(model, method, attention).uniform(fraction)
    if how == "greedy":
        return greedy_allocation(model, method, fraction, windows, attention=attention, progress=progress)
    if how == "sensitivity":
        return sensitivity_allocation(model, method, fraction, windows, attention=attention, progress=progress)
    raise ValueError(f"unknown search {how!r}; choose one of: {', '.join(SEARCHES)}")
