"""D-COUNTDOWN's practical mode: per-layer predictors of which neurons have a large |t|.

One predictor per layer and target sparsity s maps the FFN input x to logits [I], trained with binary
cross-entropy against the labels "neuron i is among the top (1 − s)·I of |t| for this token", where
``t = act(W_gate x) ⊙ (W_up x)`` is the direct coefficient of the dense model. At inference the logits
are the score; gate, up and down are read only for the neurons they keep.

Two predictor kinds (``predictor=``):

* ``"lowrank"``: ``logits = (x V) Uᵀ [+ b]``, ``V: [H, r]``, ``U: [I, r]`` (linear, no activation).
* ``"bitlinear"``: ``logits = x Wᵀ [+ b]`` with a full ``W: [I, H]`` whose weights are ternary times one
  per-matrix scale, ``W = m · clip(round(W_latent / m), −1, 1)`` with ``m = mean |W_latent|`` (BitNet
  b1.58's absmean rule, as the official code has it). Training keeps full-precision latent weights and
  passes gradients straight through the rounding; only the ternary ``W`` is kept. The activations are
  not quantised (the official code has that line commented out). ``W`` is stored in the model's dtype,
  as the official code holds it in an ``nn.Linear``: I·H numbers, a third of a gated FFN's weights (a
  packed 1.58-bit kernel would make it ≈10 times smaller; none is implemented).

Two training recipes (``recipe=``):

* ``"official"``: the released COUNTDOWN code (rustic-snob/COUNTDOWN ``train.py``, ``predictrain/``):
  no bias; the low-rank predictor starts from ``torch.pca_lowrank`` (rank r) of a Xavier-uniform random
  ``[I, H]`` matrix, each factor scaled by √σ; the bitlinear one starts from the trained ``W_up`` (the
  official code wraps ``up_proj.weight`` itself); labels ``|t_i| > k-th smallest |t|`` with
  ``k = int(I·s)`` (ties dropped); AdamW (weight decay 0.01) with a linear warm-up over the first tenth
  of the steps then ``lr·√(warmup / step)``; the batches are shuffled once and seen in the same order
  every epoch; lr 1e-3, 10 epochs (the cheapest point of the official sweep, epochs {10, 20, 40, 80} ×
  lr {1e-3, 5e-4}); rank ``H // 8`` (512 at H = 4096, the official rank, which is fixed at 512 for
  every model there). At inference a neuron is kept when its logit is > 0 (sigmoid > 0.5), so the
  sparsity is whatever the classifier gives, not the target: `countdown.sparsify` maps this to
  ``mode="threshold"``, ``threshold_rule="zero"`` (every layer's threshold 0, plus ``threshold_adjust``
  as the official ``adjust_threshold``), and the sparsity it reports is the measured one.
* ``"countdown"`` (ours, the default): a per-neuron bias ``b`` (initialised at the target keep rate's
  log-odds; it costs I numbers), random initialisation, input channels normalised by their mean |x|
  during training (folded into V afterwards: LLM inputs have a few huge outlier channels; not for
  bitlinear, whose ternary W cannot absorb a per-channel scale), exact top-k labels, one-cycle lr 1e-2,
  reshuffled every epoch, 15 epochs, rank ≈5% of the FFN's weights (`auto_rank`). At inference the
  logits are thresholded at a calibrated per-layer quantile (``threshold_rule="pooled"``) or top-k, so
  the sparsity is the target.

Training data, both recipes: (x, |t|) pairs at every position of the calibration text windows. The
official code trains on the continuation positions of lm-eval task *train* splits (ARC, WinoGrande,
PIQA, OpenBookQA, HellaSwag), which this offline package does not have; calibration text is kept
disjoint from evaluation text instead. The last tenth of the positions (the last windows) is held out
for the recall/precision reports (the released ``train.py`` trains on the *first* tenth of its trace
files and tests on the other 90%, most likely a slip; not copied). Training runs in float32 (the
official predictors are bf16 parameters updated by AdamW in bf16).

`train_predictors` returns a `Predictors`: the per-layer tensors, the sparsity they were trained for
(``sparsify`` refuses another target), the recipe and predictor kind, and the per-layer reports.
`predictor_recall` measures, on any text, how many of the true top-(1 − s) neurons a predictor keeps.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import artifact, parallel
from .data import calibration_windows
from .ffn import is_sparsified
from .methods import check_sparsity, keep_count
from .models import FFNSite, ffn_sites, fingerprint
from .spec import topk_mask

RECIPES = ("countdown", "official")
PREDICTOR_KINDS = ("lowrank", "bitlinear")

# The paper's rank 512 on Llama-3.1-8B (H=4096, I=14336) makes a predictor ≈5% of the FFN's weights;
# "auto" keeps that ratio on other shapes (our recipe).
PAPER_PREDICTOR_FRACTION = 512 * (4096 + 14336) / (3 * 4096 * 14336)


@dataclass(frozen=True)
class Recipe:
    """How one layer's predictor is trained and what keeps a neuron at inference."""

    name: str
    epochs: int
    lr: float
    batch_size: int  # token positions per optimizer step
    bias: bool  # a per-neuron bias b [I]
    ties: str  # labels: "exact" top-k, or "strict" |t| > k-th smallest (ties dropped)
    schedule: str  # "one-cycle" | "inverse-sqrt" (linear warm-up over the first tenth of the steps)
    reshuffle: bool  # new batch order every epoch, or one shuffle of fixed batches (official)
    normalise_input: bool  # train on x / mean|x| per channel (low-rank only; folded into V)
    keep_rule: str  # the threshold rule `countdown.sparsify` uses by default: "pooled" | "zero" (logit > 0)


_RECIPES = {
    "countdown": Recipe("countdown", epochs=15, lr=1e-2, batch_size=128, bias=True, ties="exact",
                        schedule="one-cycle", reshuffle=True, normalise_input=True, keep_rule="pooled"),
    # batch: the official step is one trace file, the scored positions of one 16-request lm-eval batch
    # (a few hundred tokens); 256 positions stands in for it
    "official": Recipe("official", epochs=10, lr=1e-3, batch_size=256, bias=False, ties="strict",
                       schedule="inverse-sqrt", reshuffle=False, normalise_input=False, keep_rule="zero"),
}


def get_recipe(recipe: str, predictor: str = "lowrank") -> Recipe:
    """The `Recipe` named ``recipe``, with clear errors for an unknown recipe or predictor kind."""
    if recipe not in _RECIPES:
        raise ValueError(f"unknown predictor recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    if predictor not in PREDICTOR_KINDS:
        raise ValueError(f"unknown predictor kind {predictor!r}; choose one of: {', '.join(PREDICTOR_KINDS)}")
    return _RECIPES[recipe]


def auto_rank(hidden: int, intermediate: int, ffn_matrices: int = 3) -> int:
    r = PAPER_PREDICTOR_FRACTION * ffn_matrices * hidden * intermediate / (hidden + intermediate)
    return max(16, int(round(r / 16)) * 16)


def official_rank(hidden: int) -> int:
    """The official rank 512 at H = 4096, scaled with the hidden size (H // 8) for other models."""
    return max(1, hidden // 8)


def _rank_for(sites: list[FFNSite], rank: int | str, recipe: str = "countdown") -> int:
    hidden, inter = sites[0].hidden_size, sites[0].intermediate_size
    if rank != "auto":
        return int(rank)
    if recipe == "official":
        return official_rank(hidden)
    return auto_rank(hidden, inter, 3 if sites[0].kind == "gated" else 2)


def ternary_weight(w: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58 absmean quantisation, as the official ``_weight_quant``: ``m = mean |w|`` over the
    whole matrix, ``round(w / m)`` clipped to {−1, 0, 1}, times ``m`` (same shape and dtype as ``w``)."""
    inv = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * inv).round().clamp(-1, 1) / inv


@dataclass
class LayerReport:
    layer: int
    rank: int  # 0 for a bitlinear predictor (full [I, H])
    recall: float  # of the true top-(1-s) neurons, fraction the predictor's top-k also keeps (held out)
    recall_at_zero: float  # same, when keeping the neurons with logit > 0 (the official rule)
    precision_at_zero: float
    kept_at_zero: float  # fraction of neurons with logit > 0
    loss_first: float
    loss_last: float
    predictor_fraction: float  # predictor numbers / FFN weights (also the bytes ratio at the same dtype)
    seconds: float


@dataclass
class Predictors:
    """One predictor per layer, the target sparsity they were trained for (None: untrained, for speed
    tests), how they were trained (``recipe``) and their ``kind``, and the training reports.

    ``layers[i]``: low-rank {"V": [H, r], "U": [I, r]}, bitlinear {"W": [I, H]} (ternary × scale), each
    with a bias "b": [I] under our recipe."""

    layers: list[dict[str, torch.Tensor]]
    sparsity: float | None
    reports: list[LayerReport] = field(default_factory=list)
    recipe: str = "countdown"
    kind: str = "lowrank"

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.layers[i]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.layers)

    @property
    def keep_rule(self) -> str:
        """The threshold rule `countdown.sparsify` applies to these predictors by default: "zero"
        (keep logit > 0, the official rule) or "pooled" (a calibrated quantile of the logits)."""
        return _RECIPES[self.recipe].keep_rule if self.recipe in _RECIPES else "pooled"

    def summary(self) -> dict:
        """Recipe, kind, rank, held-out recall (top-k and logit > 0, mean, min and where), kept fraction at
        logit > 0, size relative to the FFN, training time."""
        reports = self.reports
        recalls = [r.recall for r in reports]
        mean = lambda key: sum(getattr(r, key) for r in reports) / len(reports)  # noqa: E731
        return {
            "sparsity": self.sparsity,
            "recipe": self.recipe,
            "predictor": self.kind,
            "rank": reports[0].rank,
            "recall_mean": sum(recalls) / len(recalls),
            "recall_min": min(recalls),
            "recall_min_layer": recalls.index(min(recalls)),
            "recall_at_zero_mean": mean("recall_at_zero"),
            "precision_at_zero_mean": mean("precision_at_zero"),
            "kept_at_zero_mean": mean("kept_at_zero"),
            "predictor_fraction": reports[0].predictor_fraction,
            "train_seconds": sum(r.seconds for r in reports),
        }


@torch.no_grad()
def collect_pairs(model: nn.Module, sites: list[FFNSite], windows: torch.Tensor, progress: bool = True):
    """Per layer, the FFN inputs X [N, H] and |t| [N, I] (float32, CPU) of the dense model."""
    xs: list[list[torch.Tensor]] = [[] for _ in sites]
    ts: list[list[torch.Tensor]] = [[] for _ in sites]

    def see(i: int, site: FFNSite, x: torch.Tensor) -> None:
        xs[i].append(x.float().cpu())
        ts[i].append(site.coefficient(x).abs().float().cpu())

    _forward_with_ffn_inputs(model, sites, windows, see, "collect (x, |t|)", progress)
    return [torch.cat(x) for x in xs], [torch.cat(t) for t in ts]


def _forward_with_ffn_inputs(model: nn.Module, sites: list[FFNSite], windows: torch.Tensor,
                             see: Callable[[int, FFNSite, torch.Tensor], None], desc: str, progress: bool) -> None:
    """Run the dense model over ``windows`` ([n, L], one at a time), calling ``see(layer, site, x)``
    with every FFN's input x [tokens, H]."""
    def hook_for(i: int, site: FFNSite):
        def hook(module, args):
            see(i, site, args[0].reshape(-1, args[0].shape[-1]))

        return hook

    handles = [site.input_module.register_forward_pre_hook(hook_for(i, site)) for i, site in enumerate(sites)]
    device = next(model.parameters()).device
    try:
        for w in tqdm(windows, desc=desc, disable=not progress, leave=False):
            model(input_ids=w.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def _labels(t_abs: torch.Tensor, sparsity: float, ties: str = "exact") -> torch.Tensor:
    """1 where |t| is among the kept (1 − s) of its row: exactly ``I − int(I·s)`` ("exact"), or the
    official ``|t| > k-th smallest`` ("strict")."""
    return topk_mask(t_abs, sparsity, "floor", ties)


class _LowRank(nn.Module):
    def __init__(self, v: torch.Tensor, u: torch.Tensor, b: torch.Tensor | None):
        super().__init__()
        self.v, self.u = nn.Parameter(v), nn.Parameter(u)
        self.b = nn.Parameter(b) if b is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = (x @ self.v) @ self.u.t()
        return logits + self.b if self.b is not None else logits

    def export(self, in_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        v = self.v.detach() / in_scale[:, None] if in_scale is not None else self.v.detach()
        out = {"V": v, "U": self.u.detach()}
        return out | ({"b": self.b.detach()} if self.b is not None else {})


class _BitLinear(nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor | None):
        super().__init__()
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(b) if b is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w + (ternary_weight(self.w) - self.w).detach()  # straight-through estimator
        logits = x @ w.t()
        return logits + self.b if self.b is not None else logits

    def export(self, in_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = {"W": ternary_weight(self.w.detach())}
        return out | ({"b": self.b.detach()} if self.b is not None else {})


def _init_predictor(kind: str, recipe: Recipe, hidden: int, inter: int, rank: int, sparsity: float,
                    init_weight: torch.Tensor | None, g: torch.Generator, seed: int) -> nn.Module:
    b = None
    if recipe.bias:  # start at the target keep rate
        b = torch.full((inter,), math.log((1 - sparsity + 1e-6) / (sparsity + 1e-6)))
    if kind == "bitlinear":
        if recipe.name == "official" and init_weight is not None:
            w = init_weight.detach().float().clone()
        else:
            w = nn.init.xavier_uniform_(torch.empty(inter, hidden), generator=g)
        return _BitLinear(w, b)
    if recipe.name == "official":
        w = nn.init.xavier_uniform_(torch.empty(inter, hidden), generator=g)
        with torch.random.fork_rng(devices=[]):  # pca_lowrank draws from the global generator
            torch.manual_seed(seed)
            u, s, v = torch.pca_lowrank(w, q=rank)
        return _LowRank(v * s.sqrt(), u * s.sqrt(), b)
    v = torch.randn(hidden, rank, generator=g) / math.sqrt(hidden)
    u = torch.randn(inter, rank, generator=g) / math.sqrt(rank)
    return _LowRank(v, u, b)


def _inverse_sqrt(warmup: int) -> Callable[[int], float]:
    """The official schedule: linear warm-up from 0, then ``√(warmup / step)``."""
    return lambda step: step / warmup if step < warmup else math.sqrt(warmup / step)


def train_layer(
    x: torch.Tensor,
    t_abs: torch.Tensor,
    sparsity: float,
    rank: int = 0,
    *,
    recipe: str = "countdown",
    predictor: str = "lowrank",
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    holdout: float = 0.1,
    init_weight: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train one layer's predictor on (x [N, H], |t| [N, I]); returns (its tensors, held-out metrics).

    ``epochs``, ``lr``, ``batch_size``: None takes the recipe's. ``rank``: low-rank only.
    ``init_weight`` ([I, H], the layer's W_up): where the official bitlinear predictor starts."""
    rec = get_recipe(recipe, predictor)
    epochs = rec.epochs if epochs is None else epochs
    lr = rec.lr if lr is None else lr
    batch_size = rec.batch_size if batch_size is None else batch_size
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    n, hidden = x.shape
    inter = t_abs.shape[1]
    if predictor == "lowrank" and not 1 <= rank <= min(hidden, inter):
        raise ValueError(f"rank must be in [1, {min(hidden, inter)}], got {rank}")
    g = torch.Generator().manual_seed(seed)
    n_test = max(1, int(n * holdout))
    n_train = n - n_test
    x_train, x_test = x[:n_train].to(device), x[n_train:].to(device)
    y_all = _labels(t_abs, sparsity, rec.ties)
    y_train, y_test = y_all[:n_train].to(device), y_all[n_train:].to(device)
    in_scale = None
    if rec.normalise_input and predictor == "lowrank":
        in_scale = x_train.abs().mean(0).clamp_min(1e-6)
        x_train = x_train / in_scale
    net = _init_predictor(predictor, rec, hidden, inter, rank, sparsity, init_weight, g, seed).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    per_epoch = math.ceil(n_train / batch_size)
    steps = epochs * per_epoch
    if rec.schedule == "one-cycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _inverse_sqrt(max(1, steps // 10)))
    starts = torch.arange(0, n_train, batch_size)
    fixed_order = starts[torch.randperm(len(starts), generator=g)]
    losses = []
    for _ in range(epochs):
        if rec.reshuffle:
            perm = torch.randperm(n_train, generator=g).to(device)
            batches = [perm[s : s + batch_size] for s in range(0, n_train, batch_size)]
        else:
            batches = [slice(int(s), int(s) + batch_size) for s in fixed_order]
        for idx in batches:
            loss = F.binary_cross_entropy_with_logits(net(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    with torch.no_grad():
        params = {k: v.cpu() for k, v in net.export(in_scale).items()}
        logits = logits_of({k: v.to(device) for k, v in params.items()}, x_test)
        metrics = _recall_counts(logits, y_test, sparsity).metrics()
        metrics |= {"loss_first": sum(losses[:10]) / max(1, len(losses[:10])),
                    "loss_last": sum(losses[-10:]) / max(1, len(losses[-10:]))}
    return params, metrics


def logits_of(layer: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A predictor's logits [..., I] for FFN inputs x [..., H] (`countdown.ffn` computes the same)."""
    if "W" in layer:
        w = layer["W"]
        logits = x.to(w.dtype) @ w.t()
    else:
        v = layer["V"]
        logits = (x.to(v.dtype) @ v) @ layer["U"].t()
    return logits + layer["b"] if "b" in layer else logits


@dataclass
class _Counts:
    """Running sums for recall/precision of one layer (true set: the labels)."""

    true: float = 0.0
    hit_topk: float = 0.0
    kept_zero: float = 0.0
    hit_zero: float = 0.0
    entries: float = 0.0

    def add(self, other: "_Counts") -> None:
        for k in asdict(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def metrics(self) -> dict[str, float]:
        return {"recall": self.hit_topk / max(self.true, 1), "recall_at_zero": self.hit_zero / max(self.true, 1),
                "precision_at_zero": self.hit_zero / max(self.kept_zero, 1),
                "kept_at_zero": self.kept_zero / max(self.entries, 1)}


def _recall_counts(logits: torch.Tensor, labels: torch.Tensor, sparsity: float) -> _Counts:
    logits, labels = logits.float(), labels.float()
    top = torch.zeros_like(logits).scatter_(-1, logits.topk(keep_count(logits.shape[-1], sparsity), dim=-1).indices, 1.0)
    zero = (logits > 0).float()
    return _Counts(float(labels.sum()), float((top * labels).sum()), float(zero.sum()), float((zero * labels).sum()),
                   float(labels.numel()))


@dataclass
class RecallReport:
    """How well predictors find the true top-(1 − s) neurons by |t| on some text, per layer.

    ``recall_topk``: fraction of the true set kept by the predictor's own top-(1 − s) (the target
    sparsity exactly); ``recall_zero`` / ``precision_zero``: the same for the neurons with logit > 0,
    and of those kept, the fraction that are true; ``sparsity_zero``: the fraction with logit ≤ 0,
    i.e. the sparsity measured under the official keep rule."""

    sparsity: float
    recipe: str
    kind: str
    tokens: int
    recall_topk: list[float]
    recall_zero: list[float]
    precision_zero: list[float]
    sparsity_zero: list[float]

    def mean(self, key: str) -> float:
        values = getattr(self, key)
        return sum(values) / len(values)

    def summary(self) -> dict:
        return {"sparsity": self.sparsity, "recipe": self.recipe, "predictor": self.kind, "tokens": self.tokens,
                **{f"{k}_mean": self.mean(k) for k in ("recall_topk", "recall_zero", "precision_zero", "sparsity_zero")},
                "recall_topk_min": min(self.recall_topk)}


@torch.no_grad()
def predictor_recall(model: nn.Module, predictors: "Predictors", windows: Any, tokenizer: Any = None, *,
                     seq_len: int = 512, max_windows: int | None = 16, progress: bool = True) -> RecallReport:
    """Per-layer recall/precision of ``predictors`` against the dense model's true top-(1 − s) neurons
    by |t| (the recipe's label rule) on held-out ``windows`` (texts with ``tokenizer``, or token
    windows), every position; nothing is stored but running counts."""
    if predictors.sparsity is None:
        raise ValueError("these predictors are untrained (sparsity None): there is no target to measure recall against")
    sites = ffn_sites(model)
    parallel.refuse_sharded(sites, "predictor recall")
    if is_sparsified(model):
        raise ValueError("predictor_recall needs the dense model; call countdown.unsparsify(model) first")
    if len(predictors) != len(sites):
        raise ValueError(f"got predictors for {len(predictors)} layers, the model has {len(sites)}")
    windows = calibration_windows(windows, tokenizer, seq_len, max_windows)
    ties = _RECIPES[predictors.recipe].ties if predictors.recipe in _RECIPES else "exact"
    device = next(model.parameters()).device
    layers = [{k: v.to(device) for k, v in layer.items()} for layer in predictors]
    counts = [_Counts() for _ in sites]

    def see(i: int, site: FFNSite, x: torch.Tensor) -> None:
        labels = _labels(site.coefficient(x).abs().float(), predictors.sparsity, ties)
        counts[i].add(_recall_counts(logits_of(layers[i], x), labels, predictors.sparsity))

    _forward_with_ffn_inputs(model, sites, windows, see, "predictor recall", progress)
    per_layer = [c.metrics() for c in counts]
    return RecallReport(predictors.sparsity, predictors.recipe, predictors.kind, int(windows.numel()),
                        [m["recall"] for m in per_layer], [m["recall_at_zero"] for m in per_layer],
                        [m["precision_at_zero"] for m in per_layer], [1 - m["kept_at_zero"] for m in per_layer])


def _up_weight(site: FFNSite) -> torch.Tensor:
    """The weight the official bitlinear predictor starts from: W_up (a plain FFN's W_in), [I, H]."""
    return site.gated_weights()[1] if site.kind == "gated" else site.plain_weights()[0]


def train_predictors(
    model: nn.Module,
    sparsity: float,
    calibration: Any = None,
    tokenizer: Any = None,
    *,
    recipe: str = "countdown",
    predictor: str = "lowrank",
    rank: int | str = "auto",
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seq_len: int = 512,
    max_windows: int | None = 32,
    pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    progress: bool = True,
) -> Predictors:
    """Train one D-COUNTDOWN predictor per layer for target ``sparsity``.

    ``recipe``: "countdown" (ours) or "official" (the released COUNTDOWN code's; kept by logit > 0 at
    inference); ``predictor``: "lowrank" or "bitlinear" (ternary full matrix); see the module docstring
    for what each does. ``rank`` (low-rank only): "auto" is the recipe's (ours ≈5% of the FFN, official
    H // 8). ``epochs``, ``lr``, ``batch_size`` (token positions per step): None takes the recipe's.
    ``calibration``: texts (with ``tokenizer``) or token windows, as for `countdown.sparsify`; every
    position is a training pair and the last tenth is held out for the reports. ``pairs`` (from
    `collect_pairs`) skips the collection pass, e.g. when training for several targets on the same
    text. The result goes to ``sparsify(model, "d-countdown", sparsity, predictors=...)`` as is."""
    check_sparsity(sparsity)
    rec = get_recipe(recipe, predictor)
    sites = ffn_sites(model)
    parallel.refuse_sharded(sites, "predictor training")
    if is_sparsified(model):
        raise ValueError("train_predictors needs the dense model; call countdown.unsparsify(model) first")
    if calibration is None and pairs is None:
        raise ValueError("train_predictors needs calibration=... (texts with tokenizer=..., or token windows)")
    hidden, inter = sites[0].hidden_size, sites[0].intermediate_size
    r = _rank_for(sites, rank, recipe) if predictor == "lowrank" else 0
    if predictor == "lowrank" and not 1 <= r <= min(hidden, inter):
        raise ValueError(f"rank must be in [1, {min(hidden, inter)}], got {rank}")
    if pairs is None:
        windows = calibration_windows(calibration, tokenizer, seq_len, max_windows)
        if windows.shape[0] < 2:
            raise ValueError("train_predictors needs at least 2 calibration windows (the last tenth is held out)")
        pairs = collect_pairs(model, sites, windows, progress)
    xs, ts = pairs
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ffn_weights = (3 if sites[0].kind == "gated" else 2) * hidden * inter
    size = r * (hidden + inter) if predictor == "lowrank" else hidden * inter
    size += inter if rec.bias else 0
    layers, reports = [], []
    for i in tqdm(range(len(sites)), desc="train predictors", disable=not progress, leave=False):
        t0 = time.time()
        init = _up_weight(sites[i]) if predictor == "bitlinear" else None
        params, metrics = train_layer(xs[i], ts[i], sparsity, r, recipe=recipe, predictor=predictor, epochs=epochs,
                                      lr=lr, batch_size=batch_size, init_weight=init, device=device, seed=i)
        layers.append({k: v.to(dtype) for k, v in params.items()})
        reports.append(LayerReport(i, r, predictor_fraction=size / ffn_weights, seconds=time.time() - t0, **metrics))
    return Predictors(layers, float(sparsity), reports, recipe, predictor)


class PredictorCache:
    """``cache(s)``: predictors for target ``s`` trained once on ``windows`` (one collection of
    (x, |t|) pairs for every target), with each summary logged and, given ``out``, written to
    ``out/predictors_<s%>.json``. ``train_options``: `train_predictors`' recipe, predictor, rank, ..."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, out: Path | None = None,
                 log: Callable[[str], None] = print, progress: bool = True, **train_options):
        self.model, self.windows, self.out, self.log, self.progress = model, windows, out, log, progress
        self.train_options = train_options
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._trained: dict[float, Predictors] = {}

    def __call__(self, sparsity: float) -> Predictors:
        if sparsity not in self._trained:
            if self._pairs is None:
                self._pairs = collect_pairs(self.model, ffn_sites(self.model), self.windows, self.progress)
            preds = train_predictors(self.model, sparsity, pairs=self._pairs, progress=self.progress,
                                     **self.train_options)
            s = preds.summary()
            self.log(f"predictors for {sparsity:.0%} ({s['recipe']} {s['predictor']}): rank {s['rank']}, "
                     f"recall mean {s['recall_mean']:.3f} min {s['recall_min']:.3f} (layer {s['recall_min_layer']}), "
                     f"{s['predictor_fraction']:.1%} of FFN weights, trained in {s['train_seconds']:.0f}s")
            if self.out is not None:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / f"predictors_{int(round(sparsity * 100))}.json").write_text(
                    json.dumps({"summary": s, "layers": [asdict(r) for r in preds.reports]}, indent=1))
            self._trained[sparsity] = preds
        return self._trained[sparsity]


def save_predictors(model: nn.Module, predictors: Predictors, path: str | Path) -> Path:
    """Predictors alone (before thresholds are calibrated) as a safetensors artifact."""
    meta = {"kind": "predictors", "method": "d-countdown", "sparsity": predictors.sparsity,
            "predictor_sparsity": predictors.sparsity, "predictor_recipe": predictors.recipe,
            "predictor_kind": predictors.kind, "fingerprint": fingerprint(model),
            "reports": [asdict(r) for r in predictors.reports]}
    return artifact.write(path, artifact.predictor_tensors(predictors.layers), meta)


def load_predictors(model: nn.Module, path: str | Path) -> Predictors:
    """Predictors from an artifact (predictor-only or a full d-countdown sparsity artifact). Files
    written before recipes existed are our recipe's low-rank predictors."""
    meta, tensors = artifact.read(path)
    artifact.check_fingerprint(meta["fingerprint"], fingerprint(model), f"predictor artifact ({path})")
    layers = artifact.predictor_layers(tensors, len(ffn_sites(model)), path)
    reports = [LayerReport(**r) for r in meta.get("reports", [])]
    kind = meta.get("predictor_kind", "bitlinear" if "W" in layers[0] else "lowrank")
    recipe = meta.get("predictor_recipe", "countdown")
    return Predictors(layers, meta.get("predictor_sparsity", meta.get("sparsity")), reports, recipe, kind)


def random_predictors(model: nn.Module, rank: int | str = "auto", seed: int = 0) -> Predictors:
    """Untrained predictors of the trained ones' size, for speed measurements only: the kernels' time
    depends on how many neurons pass the threshold, not on which. Their sparsity is None, so they
    serve any target."""
    sites = ffn_sites(model)
    hidden, inter = sites[0].hidden_size, sites[0].intermediate_size
    r = _rank_for(sites, rank)
    ref = next(model.parameters())
    g = torch.Generator(device=ref.device).manual_seed(seed)
    layers = []
    for _ in sites:
        layer = {"V": torch.randn(hidden, r, generator=g, device=ref.device) / math.sqrt(hidden),
                 "U": torch.randn(inter, r, generator=g, device=ref.device) / math.sqrt(r),
                 "b": torch.zeros(inter, device=ref.device)}
        layers.append({k: v.to(ref.dtype) for k, v in layer.items()})
    return Predictors(layers, None)
