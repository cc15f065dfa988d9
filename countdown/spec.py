"""The vocabulary of a sparsification: what it is (`SparsitySpec`), the evaluation protocol
(`Protocol`, `OFFICIAL_PROTOCOL`, their choices and labels), and the two position/count rules every
sparse module applies (`topk_mask`, `dense_positions`). Pure data and small functions: the modules
that apply them live in `countdown.ffn` and `countdown.attention`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields

import torch

from .allocation import ATTENTION_SITES, Allocation
from .methods import Method, keep_count

POSITIONS = ("all", "decode")
COUNT_RULES = ("floor", "round")  # neurons dropped per token: int(D*s) (official) or round(D*s)
TIES = ("exact", "strict")  # top-k: exactly k kept, or official "score > k-th smallest"
# see `countdown.calibrate`; "zero": every threshold 0 (+ threshold_adjust), the official D-COUNTDOWN keep
# rule "predictor logit > 0" (predictor methods only; nothing to calibrate)
THRESHOLD_RULES = ("pooled", "mean-kth", "median-kth", "zero")


@dataclass(frozen=True)
class SparsitySpec:
    """How a model was sparsified: one object per model, shared by every sparse module.

    ``mode``: "topk" keeps the highest-scoring neurons of every token (the paper's SP-ideal);
    "threshold" keeps neurons whose score exceeds a per-layer calibrated threshold (SP-practical).

    The evaluation protocol (defaults: ours; `OFFICIAL_PROTOCOL`: the official code's):

    * ``positions``: "all" masks every token position of every forward (the strict evaluation);
      "decode" runs a generation prefill (a multi-token forward asking for the last logits only, as
      ``model.generate`` and `countdown.generate` do; the context of a log-likelihood request) densely
      and masks single-token decode steps and the positions at or after ``sparse_from`` (or those
      marked in ``sparse_positions``). A plain scoring forward (``model(ids)``: every position's
      logits, no cache) masks every position, as decoding the text token by token would
      (`countdown.ffn.ScoringForwards`).
    * ``count_rule`` (top-k and the k-th threshold rules): "floor" drops ``int(D*s)`` neurons per token
      (official), "round" drops ``round(D*s)`` (see `countdown.methods.keep_count`).
    * ``ties`` (top-k only): "exact" keeps exactly ``D - int(D*s)`` neurons (ties broken arbitrarily);
      "strict" keeps ``score > k-th smallest score`` as the official code does, so tokens whose k-th
      score is tied (frequent in bf16) keep fewer neurons than nominal.
    * ``threshold_rule`` (threshold mode): "pooled" takes the s-quantile of all calibration scores of a
      layer (Dhar et al.); "mean-kth" / "median-kth" average each calibration forward's mean per-token
      k-th smallest score over forwards by mean (official) or median; ``threshold_adjust`` is added to
      every threshold (the official ``--adjust_threshold``); "zero" (D-COUNTDOWN's predictors only)
      sets every threshold to 0, i.e. keeps the neurons whose predictor logit is > 0 (the official
      practical rule, the default for predictors trained with ``recipe="official"``), so the sparsity
      is the measured one, not the target.

    Why these defaults: "floor" is the official count and costs nothing; "exact" ties keep the nominal
    count, so the measured sparsity is the target (strict ties skip extra neurons wherever scores tie);
    "pooled" thresholds reach the target sparsity on calibration text by construction (the mean of
    per-token k-th scores is not the s-quantile, so "mean-kth" lands near, not on, the target);
    "decode" positions is what serves generation (prefill costs what dense costs); "all" is the
    stricter evaluation. `OFFICIAL_PROTOCOL` reproduces the paper's numbers.

    ``attention``: input sparsity of the attention projections (`countdown.attention`), or None.

    ``allocation``: a non-uniform target per layer and site (`countdown.Allocation`, its sites named:
    the method's and, with attention sparsity, "qkv" and "o"), or None when every layer and site has
    ``sparsity`` (and ``attention``). With one, ``sparsity`` and ``attention`` are its means (a summary).
    """

    method: str
    sparsity: float
    mode: str  # "threshold" | "topk"
    sites: tuple[str, ...]
    positions: str = "decode"
    count_rule: str = "floor"
    ties: str = "exact"
    threshold_rule: str = "pooled"
    threshold_adjust: float = 0.0
    attention: float | None = None  # input sparsity of the attention projections (TEAL-style), if any
    allocation: Allocation | None = None  # per-layer, per-site targets (None: uniform)

    def targets(self) -> float | list[list[float]]:
        """The FFN sites' targets: ``sparsity`` (uniform) or [layers][sites] (in ``sites`` order)."""
        if self.allocation is None:
            return self.sparsity
        return self.allocation.table(self.sites, self.allocation.n_layers)

    def attention_targets(self) -> float | list[list[float]] | None:
        """The attention sites' targets: ``attention`` (uniform, or None) or [layers][("qkv", "o")]."""
        if self.allocation is None or not self.allocation.has(ATTENTION_SITES[0]):
            return self.attention
        return self.allocation.table(ATTENTION_SITES, self.allocation.n_layers)

    @property
    def protocol(self) -> str:
        """The evaluation protocol in words, naming only the options that matter in this mode."""
        return protocol_label(self.mode, self.positions, self.count_rule, self.ties, self.threshold_rule,
                              self.threshold_adjust)


def protocol_label(mode: str, positions: str = "all", count_rule: str = "floor", ties: str = "exact",
                   threshold_rule: str = "pooled", threshold_adjust: float = 0.0) -> str:
    """A short canonical description of an evaluation protocol, e.g. ``"top-k floor/strict, decode"``.

    Only the options that change results in ``mode`` appear, so two protocols with the same label
    give the same numbers."""
    if mode == "topk":
        rule = f"top-k {count_rule}/{'strict ties' if ties == 'strict' else 'exact k'}"
    elif mode == "threshold":
        rule = {"pooled": "threshold pooled", "zero": "threshold logit>0"}.get(
            threshold_rule, f"threshold {threshold_rule} {count_rule}")
        if threshold_adjust:
            rule += f" {threshold_adjust:+g}"
    else:
        rule = mode
    return f"{rule}, {positions}"


def check_protocol(positions: str, count_rule: str, ties: str, threshold_rule: str, threshold_adjust: float) -> None:
    """A clear error for any protocol option out of its choices."""
    for name, value, choices in (("positions", positions, POSITIONS), ("count_rule", count_rule, COUNT_RULES),
                                 ("ties", ties, TIES), ("threshold_rule", threshold_rule, THRESHOLD_RULES)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if (isinstance(threshold_adjust, bool) or not isinstance(threshold_adjust, (int, float))
            or not math.isfinite(threshold_adjust)):
        raise ValueError(f"threshold_adjust must be a finite number (added to every threshold), got {threshold_adjust!r}")



@dataclass(frozen=True, eq=False)
class Protocol(Mapping):
    """The evaluation protocol as one frozen object: which positions are sparse and how counts, ties
    and thresholds are decided (`SparsitySpec` explains each option; the defaults are ours).

    ``countdown.sparsify(model, "m-countdown", 0.7, protocol=countdown.OFFICIAL_PROTOCOL, ...)`` takes
    it whole. It is also a read-only mapping of its five fields, so ``**OFFICIAL_PROTOCOL`` still
    spreads it into keyword arguments and it compares equal to a dict of the same values.
    ``threshold_rule=None`` means "the method's default" ("pooled"; for D-COUNTDOWN the predictors'
    ``keep_rule``), decided by `countdown.sparsify`. Every value is checked when the object is made."""

    positions: str = "decode"
    count_rule: str = "floor"
    ties: str = "exact"
    threshold_rule: str | None = None
    threshold_adjust: float = 0.0

    def __post_init__(self) -> None:
        check_protocol(self.positions, self.count_rule, self.ties, self.threshold_rule or THRESHOLD_RULES[0],
                       self.threshold_adjust)
        object.__setattr__(self, "threshold_adjust", float(self.threshold_adjust))

    def check_method(self, method: Method) -> None:
        """Refuse a threshold rule the method cannot use: "zero" keeps predictor logits > 0."""
        if self.threshold_rule == "zero" and not method.needs_predictor:
            raise ValueError(f"threshold_rule='zero' keeps predictor logits > 0 (D-COUNTDOWN's official rule); "
                             f"method {method.name!r} has no predictor: use 'pooled', 'mean-kth' or 'median-kth'")

    def replace(self, **options) -> Protocol:
        """A copy with some options changed; an unknown option name is a TypeError naming the known ones."""
        unknown = sorted(set(options) - set(self))
        if unknown:
            raise TypeError(f"unknown protocol option {', '.join(map(repr, unknown))}; "
                            f"the protocol options are {', '.join(self)}")
        return dataclasses.replace(self, **options)

    def __getitem__(self, key: str):
        if key not in _PROTOCOL_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_PROTOCOL_FIELDS)

    def __len__(self) -> int:
        return len(_PROTOCOL_FIELDS)

    def __hash__(self) -> int:
        return hash(tuple(self.values()))


_PROTOCOL_FIELDS = tuple(f.name for f in fields(Protocol))

# The protocol of the official COUNTDOWN evaluation (rustic-snob/COUNTDOWN): pass as
# ``countdown.sparsify(model, ..., protocol=OFFICIAL_PROTOCOL)`` (or ``**OFFICIAL_PROTOCOL``).
OFFICIAL_PROTOCOL = Protocol(positions="decode", count_rule="floor", ties="strict", threshold_rule="mean-kth",
                             threshold_adjust=0.0)


def topk_mask(score: torch.Tensor, sparsity: float, count_rule: str = "floor", ties: str = "exact") -> torch.Tensor:
    """0/1 mask [..., D] in the score's dtype keeping each row's highest scores.

    ``ties="exact"``: exactly ``keep_count(D, sparsity, count_rule)`` per row. ``"strict"``: the
    official rule, ``score > k-th smallest score`` with ``k = D - keep`` (the k-th taken in float32,
    compared in the score's dtype): every score tied with the k-th is dropped too."""
    width = score.shape[-1]
    keep = keep_count(width, sparsity, count_rule)
    if keep >= width:
        return torch.ones_like(score)
    if ties == "strict":
        kth = score.float().kthvalue(width - keep, dim=-1, keepdim=True).values.to(score.dtype)
        return (score > kth).to(score.dtype)
    idx = score.topk(keep, dim=-1).indices
    return torch.zeros_like(score).scatter_(-1, idx, 1.0)


def dense_positions(spec: SparsitySpec | None, sparse_from: int | None, n_positions: int) -> int:
    """How many leading positions of a forward of ``n_positions`` run densely under the position policy.

    A multi-token forward without ``sparse_from`` is a prefill here; `countdown.ffn.ScoringForwards` sets
    ``sparse_from = 0`` for the forwards of a sparsified model that are not (see its docstring)."""
    if spec is None or spec.positions == "all":
        return 0
    if sparse_from is not None:
        return min(sparse_from, n_positions)
    return n_positions if n_positions > 1 else 0  # prefill dense, decode steps sparse
