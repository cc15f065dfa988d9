"""The sparsification methods: which score decides the mask, what is dense, what is skipped.

A gated FFN is ``y = W_down t`` with ``t = act(W_gate x) * (W_up x)``: a linear combination of the
columns of ``W_down`` weighted by the coefficient vector ``t``. Each method differs only in

* the score it masks on (``scores``), one tensor per *site* that gets its own calibrated threshold,
* which products are computed densely to know that score, and which are skipped (``ffn_bytes_read``),
* how the mask is applied (``forward``). ``forward`` is the pure-PyTorch reference: it computes the
  skipped products too and zeroes them, which is numerically what a kernel that never reads the skipped
  weights produces.

``keep(site, score)`` is supplied by the caller (`countdown.ffn`): it turns a score into a 0/1 mask by
per-token top-k or by a calibrated threshold, and records the measured sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

Keep = Callable[[str, torch.Tensor], torch.Tensor]


class FFNParts(Protocol):
    """The pieces of one FFN, provided by `countdown.ffn` for either layout."""

    kind: str  # "gated" | "plain"

    def act(self, h: torch.Tensor) -> torch.Tensor: ...
    def gate(self, x: torch.Tensor) -> torch.Tensor: ...  # W_gate x (pre-activation); plain: W_in x
    def up(self, x: torch.Tensor) -> torch.Tensor: ...  # W_up x; plain FFNs have none
    def down(self, t: torch.Tensor) -> torch.Tensor: ...  # W_down t; plain: W_out t
    def predict(self, x: torch.Tensor) -> torch.Tensor: ...  # predictor's estimate of |t|
    def ffn_input(self, x: torch.Tensor) -> torch.Tensor: ...  # the FFN's input (plain: W_in's input)
    def mask_input(self, x: torch.Tensor, keep: Keep) -> torch.Tensor: ...  # x with input site "input" masked


def coefficient(parts: FFNParts, x: torch.Tensor) -> torch.Tensor:
    """The direct coefficient t: act(W_gate x) * (W_up x), or act(W_in x) for a plain FFN."""
    a = parts.act(parts.gate(x))
    return a * parts.up(x) if parts.kind == "gated" else a


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    sites: tuple[str, ...] = ("coef",)
    needs_predictor: bool = False

    def scores(self, parts: FFNParts, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Score per site on the dense model, used to calibrate thresholds."""
        raise NotImplementedError

    def forward(self, parts: FFNParts, x: torch.Tensor, keep: Keep) -> torch.Tensor:
        raise NotImplementedError

    def ffn_bytes_read(self, kind: str, skipped: dict[str, float]) -> float:
        """Fraction of the FFN's weight bytes a kernel must read, given the skipped fraction per site."""
        raise NotImplementedError


class Dense(Method):
    def scores(self, parts, x):
        return {}

    def forward(self, parts, x, keep):
        return parts.down(coefficient(parts, x))

    def ffn_bytes_read(self, kind, skipped):
        return 1.0


class Cats(Method):
    """CATS: threshold |act(W_gate x)|; gate dense, up rows and down columns of kept neurons."""

    def scores(self, parts, x):
        return {"coef": parts.act(parts.gate(x)).abs()}

    def forward(self, parts, x, keep):
        a = parts.act(parts.gate(x))
        a = a * keep("coef", a.abs())
        return parts.down(a * parts.up(x) if parts.kind == "gated" else a)

    def ffn_bytes_read(self, kind, skipped):
        s = skipped["coef"]
        return (1 + 2 * (1 - s)) / 3 if kind == "gated" else (1 + (1 - s)) / 2


class MCountdown(Method):
    """M-COUNTDOWN: threshold the indirect coefficient |W_up x|; up dense, gate rows and down columns
    of kept neurons. For a plain FFN there is no separate linear factor, so the indirect coefficient
    is W_in x itself (the pre-activation) and only W_out is sparse."""

    def scores(self, parts, x):
        return {"coef": self._indirect(parts, x).abs()}

    @staticmethod
    def _indirect(parts, x):
        return parts.up(x) if parts.kind == "gated" else parts.gate(x)

    def forward(self, parts, x, keep):
        u = self._indirect(parts, x)
        u = u * keep("coef", u.abs())
        if parts.kind == "gated":
            return parts.down(parts.act(parts.gate(x)) * u)
        return parts.down(parts.act(u))

    def ffn_bytes_read(self, kind, skipped):
        s = skipped["coef"]
        return (1 + 2 * (1 - s)) / 3 if kind == "gated" else (1 + (1 - s)) / 2


class DCountdownIdeal(Method):
    """D-COUNTDOWN (ideal): threshold the direct coefficient |t| itself; gate and up dense (an oracle),
    only the down columns of kept neurons are read."""

    def scores(self, parts, x):
        return {"coef": coefficient(parts, x).abs()}

    def forward(self, parts, x, keep):
        t = coefficient(parts, x)
        return parts.down(t * keep("coef", t.abs()))

    def ffn_bytes_read(self, kind, skipped):
        s = skipped["coef"]
        return (2 + (1 - s)) / 3 if kind == "gated" else (1 + (1 - s)) / 2


class DCountdown(Method):
    """D-COUNTDOWN (practical): a low-rank predictor estimates |t| from x; gate, up and down are all
    read only for the predicted neurons. The predictor's own bytes are counted by `countdown.predictor`."""

    def scores(self, parts, x):
        return {"coef": parts.predict(x)}

    def forward(self, parts, x, keep):
        mask = keep("coef", parts.predict(x))
        return parts.down(coefficient(parts, x) * mask)

    def ffn_bytes_read(self, kind, skipped):
        return 1 - skipped["coef"]


class Teal(Method):
    """TEAL-style: threshold the magnitude of each matrix's *input*: |x| for gate/up (or W_in) columns,
    |t| for down (or W_out) columns. Sparsity applies to both sites."""

    def scores(self, parts, x):
        return {"input": parts.ffn_input(x).abs(), "coef": coefficient(parts, x).abs()}

    def forward(self, parts, x, keep):
        x = parts.mask_input(x, keep)
        t = coefficient(parts, x)
        return parts.down(t * keep("coef", t.abs()))

    def ffn_bytes_read(self, kind, skipped):
        s_in, s_coef = skipped["input"], skipped["coef"]
        return (2 * (1 - s_in) + (1 - s_coef)) / 3 if kind == "gated" else ((1 - s_in) + (1 - s_coef)) / 2


class CollectScores(Method):
    """Calibration only: run the FFN densely and record the scores of several methods at once, at
    sites named ``"<method>:<site>"``, so one pass over calibration text serves them all."""

    def __init__(self, methods: list[Method]):
        object.__setattr__(self, "methods", tuple(methods))
        sites = tuple(f"{m.name}:{site}" for m in methods for site in m.sites)
        super().__init__("collect", "calibration pass", sites, any(m.needs_predictor for m in methods))

    def forward(self, parts, x, keep):
        for m in self.methods:
            for site, score in m.scores(parts, x).items():
                keep(f"{m.name}:{site}", score)
        return parts.down(coefficient(parts, x))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Dense("dense", "no sparsity (baseline)", sites=()),
        Cats("cats", "CATS: mask on |act(gate x)|; gate dense, up+down sparse"),
        Teal("teal", "TEAL-style: mask on |input| of every FFN matrix", sites=("input", "coef")),
        MCountdown("m-countdown", "M-COUNTDOWN: mask on indirect coefficient |up x|; up dense, gate+down sparse"),
        DCountdownIdeal("d-countdown-ideal", "D-COUNTDOWN oracle: mask on |t|; gate+up dense, down sparse"),
        DCountdown("d-countdown", "D-COUNTDOWN practical: predictor of |t|; gate, up, down sparse", needs_predictor=True),
    )
}


def get_method(name: str) -> Method:
    """Look a method up by name; unknown names get an error that lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
