"""The sparsification methods: which score decides the mask, what is dense, what is skipped.

A gated FFN is ``y = W_down t`` with ``t = act(W_gate x) * (W_up x)``: a linear combination of the
columns of ``W_down`` weighted by the coefficient vector ``t``. A method is one class here, and the
class is everything there is to know about it:

* ``scores``: the score it masks on, one tensor per *site* (each site gets its own threshold);
* ``forward``: the pure-PyTorch reference. It computes the skipped products too and zeroes them, which
  is numerically what a kernel that never reads the skipped weights produces;
* ``ffn_bytes_read``: which products are dense and which are skipped, as a fraction of FFN bytes;
* ``kernel_forward`` (``has_kernel``): the Triton op that serves one decode token, if any.

``keep(site, score)`` is supplied by the caller (`countdown.ffn`): it turns a score into a 0/1 mask by
per-token top-k or by a calibrated threshold. Scores and masks are ``[..., I]`` (one row per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import torch

from . import kernels

Keep = Callable[[str, torch.Tensor], torch.Tensor]


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float in [0, 1), or a clear error."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (fraction of FFN neurons skipped per token), got {sparsity}")
    return float(sparsity)


def keep_count(width: int, sparsity: float, rule: str = "floor") -> int:
    """Neurons kept per token out of ``width`` at ``sparsity`` in top-k mode (the one counting rule).

    ``rule="floor"`` drops ``int(width * sparsity)`` neurons, as the official COUNTDOWN code does
    (``num_to_zero = int(dim * ratio)``, in that operand order, float artefacts included);
    ``"round"`` drops ``round(width * sparsity)``. They differ by one neuron when the fractional part
    is >= 0.5 (e.g. 0.8 x 14336 = 11468.8). The official ``max(1, .)`` (one neuron dropped even at
    sparsity 0) is not reproduced: sparsity 0 is the dense model here."""
    if rule == "floor":
        return width - int(width * sparsity)
    if rule == "round":
        return width - int(round(sparsity * width))
    raise ValueError(f"count rule must be 'floor' or 'round', got {rule!r}")


class FFNParts(Protocol):
    """The pieces of one FFN, provided by `countdown.ffn` for either layout ([..., H] in, [..., I] out)."""

    kind: str  # "gated" | "plain"

    def act(self, h: torch.Tensor) -> torch.Tensor: ...
    def gate(self, x: torch.Tensor) -> torch.Tensor: ...  # W_gate x (pre-activation); plain: W_in x
    def up(self, x: torch.Tensor) -> torch.Tensor: ...  # W_up x; plain FFNs have none
    def down(self, t: torch.Tensor) -> torch.Tensor: ...  # W_down t; plain: W_out t
    def predict(self, x: torch.Tensor) -> torch.Tensor: ...  # predictor's estimate of |t|
    def ffn_input(self, x: torch.Tensor) -> torch.Tensor: ...  # the FFN's input (plain: W_in's input)
    def mask_input(self, x: torch.Tensor, keep: Keep) -> torch.Tensor: ...  # x with input site "input" masked
    # for kernels (gated FFNs only): [I, H] row-major views, one row per neuron
    kernel_act: str | None

    def gate_weight(self) -> torch.Tensor: ...
    def up_weight(self) -> torch.Tensor: ...
    def down_t(self) -> torch.Tensor: ...


def coefficient(parts: FFNParts, x: torch.Tensor) -> torch.Tensor:
    """The direct coefficient t: act(W_gate x) * (W_up x), or act(W_in x) for a plain FFN."""
    a = parts.act(parts.gate(x))
    return a * parts.up(x) if parts.kind == "gated" else a


def _two_of_three(kind: str, skipped: float) -> float:
    """Bytes read when one projection is dense and the other two are read for kept neurons only."""
    return (1 + 2 * (1 - skipped)) / 3 if kind == "gated" else (1 + (1 - skipped)) / 2


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    sites: tuple[str, ...] = ("coef",)
    needs_predictor: bool = False
    has_kernel: ClassVar[bool] = False

    def scores(self, parts: FFNParts, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Score per site on the dense model, used to calibrate thresholds."""
        raise NotImplementedError

    def forward(self, parts: FFNParts, x: torch.Tensor, keep: Keep) -> torch.Tensor:
        raise NotImplementedError

    def ffn_bytes_read(self, kind: str, skipped: dict[str, float]) -> float:
        """Fraction of the FFN's weight bytes a kernel must read, given the skipped fraction per site."""
        raise NotImplementedError

    def kernel_forward(self, parts: FFNParts, x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """The FFN output for decode tokens x through this method's Triton op (``has_kernel`` only);
        ``threshold`` is the layer's 1-element "coef" threshold on x's device."""
        raise NotImplementedError(f"method {self.name!r} has no kernel")


class Dense(Method):
    def scores(self, parts, x):
        return {}

    def forward(self, parts, x, keep):
        return parts.down(coefficient(parts, x))

    def ffn_bytes_read(self, kind, skipped):
        return 1.0


class Cats(Method):
    """CATS: threshold |act(W_gate x)|; gate dense, up rows and down columns of kept neurons."""

    has_kernel = True

    def scores(self, parts, x):
        return {"coef": parts.act(parts.gate(x)).abs()}

    def forward(self, parts, x, keep):
        a = parts.act(parts.gate(x))
        a = a * keep("coef", a.abs())
        return parts.down(a * parts.up(x) if parts.kind == "gated" else a)

    def ffn_bytes_read(self, kind, skipped):
        return _two_of_three(kind, skipped["coef"])

    def kernel_forward(self, parts, x, threshold):
        return kernels.fused_gather_ffn(x, parts.gate_weight(), parts.up_weight(), parts.down_t(), threshold,
                                        act=parts.kernel_act, dense="gate")


class MCountdown(Method):
    """M-COUNTDOWN: threshold the indirect coefficient |W_up x|; up dense, gate rows and down columns
    of kept neurons. For a plain FFN there is no separate linear factor, so the indirect coefficient
    is W_in x itself (the pre-activation) and only W_out is sparse."""

    has_kernel = True

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
        return _two_of_three(kind, skipped["coef"])

    def kernel_forward(self, parts, x, threshold):
        # the op's dense projection is W_up here, its sparse one W_gate
        return kernels.fused_gather_ffn(x, parts.up_weight(), parts.gate_weight(), parts.down_t(), threshold,
                                        act=parts.kernel_act, dense="up")


class DCountdownIdeal(Method):
    """D-COUNTDOWN (ideal): threshold the direct coefficient |t| itself; gate and up dense (an oracle),
    only the down columns of kept neurons are read."""

    has_kernel = True

    def scores(self, parts, x):
        return {"coef": coefficient(parts, x).abs()}

    def forward(self, parts, x, keep):
        t = coefficient(parts, x)
        return parts.down(t * keep("coef", t.abs()))

    def ffn_bytes_read(self, kind, skipped):
        s = skipped["coef"]
        return (2 + (1 - s)) / 3 if kind == "gated" else (1 + (1 - s)) / 2

    def kernel_forward(self, parts, x, threshold):
        return kernels.coefficient_ffn(x, parts.gate_weight(), parts.up_weight(), parts.down_t(), threshold,
                                       act=parts.kernel_act)


class DCountdown(Method):
    """D-COUNTDOWN (practical): a low-rank predictor estimates |t| from x; gate, up and down are all
    read only for the predicted neurons. The predictor's own bytes are counted by `countdown.predictor`."""

    has_kernel = True

    def scores(self, parts, x):
        return {"coef": parts.predict(x)}

    def forward(self, parts, x, keep):
        mask = keep("coef", parts.predict(x))
        return parts.down(coefficient(parts, x) * mask)

    def ffn_bytes_read(self, kind, skipped):
        return 1 - skipped["coef"]

    def kernel_forward(self, parts, x, threshold):
        return kernels.predicted_sparse_ffn(x, parts.predict(x), parts.gate_weight(), parts.up_weight(),
                                            parts.down_t(), threshold, act=parts.kernel_act)


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
SPARSE_METHODS: tuple[str, ...] = tuple(name for name in METHODS if name != "dense")
KERNEL_METHODS: tuple[str, ...] = tuple(name for name, m in METHODS.items() if m.has_kernel)


def get_method(name: str) -> Method:
    """Look a method up by name; unknown names get an error that lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
