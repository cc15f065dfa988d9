"""Natural activation sparsity of a dense model's FFN coefficients (the "lazy neuron" measure).

Li et al. ("The Lazy Neuron Phenomenon", ICLR 2023) count, in ReLU transformers, the fraction of FFN
coefficients that are exactly zero after the activation. The models countdown serves are SiLU/GELU
(gated): their coefficients ``t = act(x W_gate) * (x W_up)`` (the down projection's input; for a plain
FFN ``act(x W_in)``) are almost never exactly zero, so exact zeros alone would say "0%". This module
reports, per layer, over every token of the given windows:

* ``zeros``: the fraction of coefficients that are exactly 0 (the paper's measure, as defined);
* ``below[eps]``: the fraction with ``|t_i| <= eps * mean_j |t_j|``, the mean taken over the neurons of
  the same token and layer. Relative to the token's own mean so that it does not depend on a layer's
  scale (the residual stream grows with depth); ``eps`` small (0.01) asks "near zero", larger ones
  (0.1, 0.5) how much is small against the typical coefficient;
* ``mass[q]``: the fraction of coefficients a token can drop while the rest keep a share ``q`` of its
  L1 mass ``sum_i |t_i|`` (drop the smallest first): the top-k sparsity an oracle gets at that loss of
  mass, the scale-free counterpart of "how many neurons does a token use".

The model is run densely (a sparsified model is refused: the measure is the model's own). Statistics
are exact (no sampling); each layer is reduced per forward, so memory is one layer's [T, I] at a time.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .ffn import sparse_modules
from .models import ffn_sites

EPSILONS = (0.01, 0.1, 0.5)
MASS_SHARES = (0.9, 0.99)


@dataclass
class NaturalSparsity:
    """Per-layer fractions (lists indexed by layer) and the token count they were measured on."""

    n_tokens: int
    zeros: list[float]
    below: dict[float, list[float]]  # eps -> per layer
    mass: dict[float, list[float]]  # share of L1 mass kept -> per layer fraction droppable
    intermediate_size: int = 0
    layers: int = field(init=False)

    def __post_init__(self) -> None:
        self.layers = len(self.zeros)

    def summary(self) -> dict[str, tuple[float, float, float]]:
        """{measure: (mean over layers, min layer, max layer)}; measures named ``zeros``,
        ``below_<eps>``, ``mass_<q>``."""
        rows = {"zeros": self.zeros}
        rows.update({f"below_{eps:g}": v for eps, v in self.below.items()})
        rows.update({f"mass_{q:g}": v for q, v in self.mass.items()})
        return {name: (statistics.fmean(v), min(v), max(v)) for name, v in rows.items()}


class _Counter:
    """Sums one layer's counts over forwards; called with that layer's coefficients [.., I]."""

    def __init__(self, epsilons: Sequence[float], shares: Sequence[float]):
        self.epsilons, self.shares = tuple(epsilons), tuple(shares)
        self.tokens = 0
        self.zeros = 0
        self.below = [0] * len(self.epsilons)
        self.mass = [0] * len(self.shares)
        self.width = 0

    def add(self, t: torch.Tensor) -> None:
        a = t.detach().reshape(-1, t.shape[-1]).abs().float()  # [T, I]
        n, width = a.shape
        self.width = width
        self.tokens += n
        self.zeros += int((a == 0).sum())
        mean = a.mean(dim=1, keepdim=True)
        for i, eps in enumerate(self.epsilons):
            self.below[i] += int((a <= eps * mean).sum())
        ordered = a.sort(dim=1).values  # ascending: the cumulative mass of the smallest
        dropped_mass = ordered.cumsum(dim=1)
        total = dropped_mass[:, -1:]
        for i, q in enumerate(self.shares):
            # neurons droppable: the longest prefix of the smallest whose mass stays <= (1 - q) of the total
            self.mass[i] += int((dropped_mass <= (1.0 - q) * total).sum())

    def fractions(self) -> tuple[float, list[float], list[float]]:
        cells = max(self.tokens * self.width, 1)
        return self.zeros / cells, [b / cells for b in self.below], [m / cells for m in self.mass]


@torch.no_grad()
def natural_sparsity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    epsilons: Sequence[float] = EPSILONS,
    mass_shares: Sequence[float] = MASS_SHARES,
    prefix: Sequence[int] = (),
) -> NaturalSparsity:
    """Natural sparsity of the dense ``model``'s FFN coefficients over ``windows`` ([n, T] token ids,
    one forward each, every position counted; ``prefix``, e.g. Gemma's ``<bos>``, goes before each
    window and is counted too, as the model sees it). See the module docstring for the measures."""
    if not isinstance(windows, torch.Tensor) or windows.dtype != torch.long or windows.dim() != 2 or windows.numel() == 0:
        raise ValueError("windows must be a non-empty [n, T] torch.long tensor of token ids")
    for eps in epsilons:
        if not eps >= 0:
            raise ValueError(f"epsilons must be >= 0 (a fraction of the token's mean |coefficient|), got {eps!r}")
    for q in mass_shares:
        if not 0 < q <= 1:
            raise ValueError(f"mass_shares must be in (0, 1] (the share of L1 mass kept), got {q!r}")
    if sparse_modules(model):
        raise ValueError("natural sparsity is a property of the dense model; call countdown.unsparsify(model) first")
    sites = ffn_sites(model)
    counters = [_Counter(epsilons, mass_shares) for _ in sites]
    hooks = []
    for site, counter in zip(sites, counters):
        # the down (out) projection's input is the coefficient vector in both FFN layouts
        down = site.modules["down_proj" if site.kind == "gated" else "out_proj"]
        hooks.append(down.register_forward_pre_hook(lambda _m, args, c=counter: c.add(args[0])))
    device = next(model.parameters()).device
    head = torch.tensor(list(prefix), dtype=torch.long)
    try:
        for window in windows:
            ids = torch.cat([head, window.cpu()]).to(device).unsqueeze(0)
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    per_layer = [c.fractions() for c in counters]
    return NaturalSparsity(
        n_tokens=counters[0].tokens,
        zeros=[z for z, _, _ in per_layer],
        below={eps: [b[i] for _, b, _ in per_layer] for i, eps in enumerate(epsilons)},
        mass={q: [m[i] for _, _, m in per_layer] for i, q in enumerate(mass_shares)},
        intermediate_size=counters[0].width,
    )
