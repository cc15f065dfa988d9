"""Sparsing Law's PPL-p% sparsity: the sparsity at which perplexity rises by p% over dense.

Luo et al. ("Sparsing Law", 2024) define a method's PPL-p% sparsity as the highest sparsity whose
perplexity stays within ``(1 + p) * dense``. Here it is found by bisection on the target sparsity:
every probe sparsifies the model (`countdown.sparsify`, threshold mode, thresholds calibrated on the
calibration windows), evaluates `countdown.perplexity` under the model's positions protocol, and
narrows the bracket ``[below, above]``: ``below`` the highest probed target with an increase of at
most p, ``above`` the lowest with more. The increases ask for the same probes (a 5% search starts from
the 1% search's probes), so several ``p`` share one list of probes. Perplexity against sparsity is
monotone in practice but measured, so the bracket is what was seen, and ``estimate`` interpolates the
target linearly in the increase between the two ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .api import calibrate_methods, sparsify, unsparsify
from .evaluate import perplexity
from .methods import get_method


@dataclass(frozen=True)
class Probe:
    """One evaluated target: the measured (reported-site) sparsity and the perplexity."""

    target: float
    measured: float
    ppl: float
    increase: float  # ppl / dense - 1


@dataclass(frozen=True)
class Bracket:
    """Where perplexity crosses ``(1 + p) * dense``: ``below`` (None: even the lowest probe is over,
    or nothing probed) and ``above`` (None: still within p at the highest target searched)."""

    p: float
    below: Probe | None
    above: Probe | None

    @property
    def estimate(self) -> float:
        """The target where the increase reaches p, linear between the bracket's ends (nan if open)."""
        if self.below is None or self.above is None:
            return float("nan")
        lo, hi = self.below, self.above
        if hi.increase == lo.increase:
            return lo.target
        return lo.target + (self.p - lo.increase) / (hi.increase - lo.increase) * (hi.target - lo.target)


def sparsity_at_increase(
    measure: Callable[[float], tuple[float, float]],
    dense_ppl: float,
    increases: Sequence[float] = (0.01, 0.05),
    *,
    low: float = 0.0,
    high: float = 0.8,
    steps: int = 4,
) -> tuple[dict[float, Bracket], list[Probe]]:
    """Bisect on the target sparsity for each increase p (``0.01`` is PPL-1%). ``measure(target)``
    returns (measured sparsity, perplexity). ``low`` counts as dense (increase 0, not probed when 0);
    ``high`` is probed first; each p then takes ``steps`` more midpoints at most (fewer where earlier
    probes already narrowed its bracket below the width ``steps`` midpoints reach). Returns
    ({p: Bracket}, every probe in the order taken)."""
    if not dense_ppl > 0 or not math.isfinite(dense_ppl):
        raise ValueError(f"dense_ppl must be a positive finite perplexity, got {dense_ppl!r}")
    if not 0 <= low < high < 1:
        raise ValueError(f"need 0 <= low < high < 1 (target sparsities), got low={low}, high={high}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if any(not p > 0 for p in increases):
        raise ValueError(f"increases are fractions > 0 (0.01 is 1%), got {list(increases)}")
    probes: dict[float, Probe] = {}
    order: list[Probe] = []

    def probe(target: float) -> Probe:
        key = round(target, 9)
        if key not in probes:
            measured, ppl = measure(target)
            probes[key] = Probe(target, measured, ppl, ppl / dense_ppl - 1.0)
            order.append(probes[key])
        return probes[key]

    floor = Probe(low, 0.0, dense_ppl, 0.0) if low == 0 else None
    probe(high)
    if floor is None:
        probe(low)
    width = (high - low) / 2 ** steps
    brackets = {}
    for p in sorted(increases):
        for _ in range(steps + 1):
            seen = sorted(probes.values(), key=lambda q: q.target) + ([floor] if floor else [])
            within = [q for q in seen if q.increase <= p]
            over = [q for q in seen if q.increase > p]
            below = max(within, key=lambda q: q.target) if within else None
            above = min((q for q in over if below is None or q.target > below.target),
                        key=lambda q: q.target, default=None)
            if below is None or above is None or above.target - below.target <= width + 1e-12:
                break
            probe((below.target + above.target) / 2)
        brackets[p] = Bracket(p, below, above)
    return brackets, order


def ppl_p_sparsity(
    model: nn.Module,
    method: str,
    calibration: torch.Tensor,
    eval_ids: torch.Tensor,
    *,
    increases: Sequence[float] = (0.01, 0.05),
    model_wide: bool = False,
    positions: str = "decode",
    low: float = 0.0,
    high: float = 0.8,
    steps: int = 4,
    context: int = 512,
    prefix: Sequence[int] = (),
    dense_ppl: float | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[float, Bracket], list[Probe], float]:
    """PPL-p% sparsity of ``method`` on the dense ``model``: threshold mode, thresholds calibrated on
    ``calibration`` ([n, T] token windows, one pass reused by every probe), perplexity of ``eval_ids``
    under ``positions`` (windows of ``context``; ``prefix``: `data.document_prefix`). ``model_wide``
    also sparsifies the attention projections' inputs at the same target (TEAL model-wide; its
    attention thresholds are calibrated per probe). Returns (brackets, probes, dense perplexity);
    the model is dense again afterwards."""
    m = get_method(method)
    if m.needs_predictor:
        raise ValueError(f"method {method!r} needs trained predictors per target; PPL-p% bisection serves "
                         "predictor-free methods")
    if dense_ppl is None:
        dense_ppl = perplexity(model, eval_ids, context=context, positions=positions, prefix=prefix,
                               progress=False).ppl
    shared = None if model_wide else calibrate_methods(model, [method], calibration, max_windows=None,
                                                       progress=False)[method]

    def measure(target: float) -> tuple[float, float]:
        sparsify(model, method, target, calibration=calibration if model_wide else shared, mode="threshold",
                 positions=positions, attention=target if model_wide else None, max_windows=None, progress=False)
        try:
            r = perplexity(model, eval_ids, context=context, prefix=prefix, progress=False)
        finally:
            unsparsify(model)
        if log is not None:
            log(f"{method}{' model-wide' if model_wide else ''} @ {target:.4f}: measured {r.sparsity:.3f}, "
                f"ppl {r.ppl:.3f} ({r.ppl / dense_ppl - 1:+.2%})")
        return r.sparsity, r.ppl

    brackets, probes = sparsity_at_increase(measure, dense_ppl, increases, low=low, high=high, steps=steps)
    return brackets, probes, dense_ppl
