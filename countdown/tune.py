"""`tune`: the fastest configuration a search finds for a byte budget or a quality budget.

A byte budget (``bytes=0.65``: a decode step reading 65% of the dense step's weight bytes) is one
search (`countdown.budget.search`) and one check of its perplexity on held-out text. A quality budget
(``max_ppl_increase=0.05``) bisects over byte budgets: each try searches an allocation, installs it
and scores it on *tuning* text (calibration text the thresholds were not taken from), keeping the
fewest bytes within the budget; the pick is then scored on the held-out text, which the bisection never
saw. Everything runs under the decode protocol (prefill dense, decode positions sparse) with pooled
thresholds calibrated per (layer, site).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import budget
from .allocation import Allocation
from .api import sparsify, unsparsify
from .evaluate import perplexity
from .ffn import sparsity_spec
from .options import KernelPolicy

PROTOCOL = "decode positions (prefill dense), pooled thresholds per (layer, site)"


@dataclass
class TuneResult:
    method: str
    search: str
    attention: bool
    allocation: Allocation
    bytes: float  # bytes read per decode step at the targets, as a fraction of the dense step's
    bytes_measured: float  # the same at the sparsities measured on the held-out text
    ppl: float
    dense_ppl: float
    protocol: str = PROTOCOL
    tries: list[tuple[float, float]] = field(default_factory=list)  # (bytes, Δppl on tuning text) per bisection step

    @property
    def delta(self) -> float:
        return self.ppl / self.dense_ppl - 1


def tune(model: nn.Module, method: str, calibration: torch.Tensor, search_windows: torch.Tensor,
         eval_ids: torch.Tensor, *, bytes: float | None = None, max_ppl_increase: float | None = None,
         search: str = "sensitivity", attention: bool = False, tune_ids: torch.Tensor | None = None,
         context: int = 512, prefix: Sequence[int] = (), steps: int = 6, kernels: str | KernelPolicy = "auto",
         log: Callable[[str], None] = print) -> TuneResult:
    """The configuration ``search`` finds for ``bytes`` (a fraction of the dense step's weight bytes)
    or ``max_ppl_increase`` (a fraction: 0.05 is +5% perplexity; bisection over byte budgets, ``steps``
    tries, scored on ``tune_ids``). ``calibration``: [n, T] token ids for the thresholds;
    ``search_windows``: [n, T'] token ids the search measures on; ``eval_ids``: held-out [n] ids.
    The model is left sparsified with the result (save it with ``model.save_pretrained``), its kernels
    set by ``kernels`` (`countdown.sparsify`'s)."""
    if (bytes is None) == (max_ppl_increase is None):
        raise ValueError("give either a byte budget (bytes=) or a quality budget (max_ppl_increase=), one of them")
    if search not in budget.SEARCHES:
        raise ValueError(f"unknown search {search!r}; choose one of: {', '.join(budget.SEARCHES)}")
    if max_ppl_increase is not None and tune_ids is None:
        raise ValueError("a quality budget needs tune_ids: text to bisect on, apart from the held-out text")
    bm = budget.byte_model(model, method, attention)
    common = {"context": context, "positions": "decode", "prefix": prefix, "progress": False}
    profile = None

    def find(fraction: float) -> Allocation:
        nonlocal profile
        if search == "sensitivity":
            if profile is None:
                log("measuring the sensitivity profile on calibration text …")
                profile = budget.sensitivity_profile(model, method, search_windows, attention=attention)
            return budget.knapsack_allocation(profile, bm, fraction)
        return budget.search(model, method, fraction, search_windows, search, attention=attention)

    def install(allocation: Allocation) -> None:
        sparsify(model, method, allocation, calibration=calibration, positions="decode", max_windows=None,
                 progress=False, kernels=kernels)

    dense_eval = perplexity(model, eval_ids, **common).ppl
    tries: list[tuple[float, float]] = []
    if bytes is not None:
        fraction = bytes
        bm.uniform(fraction)  # reachable, or a clear error before any search
    else:
        dense_tune = perplexity(model, tune_ids, **common).ppl
        lo = bm.fraction(bm.uniform_at(0.9))  # the fewest bytes the searches reach
        hi = 1.0
        best = None
        for _ in range(steps):
            mid = (lo + hi) / 2
            install(find(mid))
            delta = perplexity(model, tune_ids, **common).ppl / dense_tune - 1
            unsparsify(model)
            tries.append((mid, delta))
            log(f"bytes {mid:.3f}: Δppl {delta:+.2%} on tuning text")
            if delta <= max_ppl_increase:
                hi, best = mid, mid
            else:
                lo = mid
        if best is None:
            raise ValueError(f"no configuration within +{max_ppl_increase:.1%} perplexity was found down to "
                             f"{hi:.3f} of the dense bytes: raise the budget, or keep the model dense")
        fraction = best
    allocation = find(fraction)
    install(allocation)
    result = perplexity(model, eval_ids, **common)
    measured = bm.measured_fraction({**result.site_sparsity, **result.attention_sparsity})
    spec = sparsity_spec(model)
    return TuneResult(method, search, attention, spec.allocation if spec.allocation is not None else allocation,
                      bm.fraction(allocation), measured, result.ppl, dense_eval, tries=tries)
