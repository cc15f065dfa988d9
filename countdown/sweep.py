"""Calibrate each method once, then evaluate it at every target sparsity: the grid behind
`countdown run` and `countdown sweep`. Finished points are appended to a JSON-lines file, so a re-run
with the same file skips them (resume)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .api import calibrate_methods, sparsify, unsparsify
from .evaluate import perplexity
from .methods import check_sparsity, get_method
from .spec import check_protocol, protocol_label


@dataclass
class Point:
    method: str
    mode: str
    target: float
    measured: float
    ppl: float
    delta_ppl: float = float("nan")
    ffn_bytes_read: float = 1.0
    site_sparsity: dict[str, float] = field(default_factory=dict)
    layer_sparsity: list[float] = field(default_factory=list)
    n_tokens: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # e.g. downstream task accuracies
    # the evaluation protocol (see `countdown.spec.SparsitySpec`)
    positions: str = "all"  # which positions were sparse: "all" or "decode" (context dense)
    count_rule: str = "floor"
    ties: str = "exact"
    threshold_rule: str = "pooled"
    threshold_adjust: float = 0.0
    attention: float | None = None  # input sparsity target of the attention projections, if any
    attention_sparsity: dict[str, float] = field(default_factory=dict)  # measured per site (qkv, o)

    @property
    def protocol(self) -> str:
        """The protocol in words, only the options that matter for this point (e.g. dense: positions)."""
        return protocol_label(self.mode, self.positions, self.count_rule, self.ties, self.threshold_rule,
                              self.threshold_adjust)

    @property
    def key(self) -> tuple[str, str, float, str]:
        return (self.method, self.mode, round(self.target, 6), self.protocol, self.attention)


# what a results line written before the protocol was recorded was measured with
_LEGACY = {"count_rule": "round", "ties": "exact", "threshold_rule": "pooled", "threshold_adjust": 0.0}


def load_points(path: Path | None) -> list[Point]:
    if path is None or not path.is_file():
        return []
    return [Point(**{**_LEGACY, **json.loads(line)}) for line in path.read_text().splitlines() if line.strip()]


def _append(path: Path | None, point: Point) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(asdict(point)) + "\n")


def each_sparsified(
    model: nn.Module,
    todo: dict[str, list[float]],
    calibration_windows: torch.Tensor,
    *,
    mode: str = "threshold",
    positions: str = "all",
    predictors_for: Callable[[float], Sequence[dict]] | None = None,
    attention: float | None = None,
    progress: bool = True,
    **protocol,
) -> Iterator[tuple[str, float, Sequence[dict] | None]]:
    """Yield (method, sparsity, predictors) for every target in ``todo`` ({method: [sparsities]}) with
    the model sparsified for it; the model is dense again after each step and at the end.
    ``protocol``: `countdown.sparsify`'s count_rule, ties, threshold_rule, threshold_adjust."""
    cals = {}
    shared = [name for name in todo if not get_method(name).needs_predictor]
    if mode == "threshold" and shared:  # one calibration pass serves every method and sparsity
        cals = calibrate_methods(model, shared, calibration_windows, max_windows=None, progress=progress)
    for name, targets in todo.items():
        for s in targets:
            # predictors are trained per target sparsity, so their scores are calibrated per target too
            preds = predictors_for(s) if get_method(name).needs_predictor else None
            # CHESS measures a per-neuron statistic on calibration text even in top-k mode
            needs_text = mode == "threshold" or get_method(name).stats
            cal = cals.get(name, calibration_windows if needs_text else None)
            if attention is not None:
                cal = calibration_windows  # attention thresholds are calibrated with the FFN's, from tokens
            sparsify(model, name, s, calibration=cal, mode=mode, positions=positions, predictors=preds,
                     attention=attention, max_windows=None, progress=progress, **protocol)
            try:
                yield name, s, preds
            finally:
                unsparsify(model)


def run_grid(
    model: nn.Module,
    methods: list[str],
    sparsities: list[float],
    calibration_windows: torch.Tensor,
    eval_ids: torch.Tensor,
    *,
    mode: str = "threshold",
    positions: str = "all",
    count_rule: str = "floor",
    ties: str = "exact",
    threshold_rule: str = "pooled",
    threshold_adjust: float = 0.0,
    attention: float | None = None,
    context: int = 512,
    stride: int | None = None,
    prefix: Sequence[int] = (),
    results_file: Path | None = None,
    predictors_for: Callable[[float], Sequence[dict]] | None = None,
    extra_eval: Callable[[nn.Module], dict] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[Point]:
    """Dense once, then every (method, sparsity); returns all points, finished ones included.

    The protocol options (positions, count_rule, ties, threshold_rule, threshold_adjust) and
    ``attention`` (input sparsity of the attention projections) are those of `countdown.sparsify`;
    every point records them, and only points of this protocol and attention setting are returned."""
    for name in methods:
        get_method(name)
    for s in sparsities:
        check_sparsity(s)
    check_protocol(positions, count_rule, ties, threshold_rule, threshold_adjust)
    protocol = {"count_rule": count_rule, "ties": ties, "threshold_rule": threshold_rule,
                "threshold_adjust": float(threshold_adjust)}
    done = {p.key: p for p in load_points(results_file)}

    def evaluate(method: str, point_mode: str, target: float) -> Point:
        t0 = time.time()
        r = perplexity(model, eval_ids, context=context, stride=stride, positions=positions, prefix=prefix,
                       progress=progress)
        point = Point(method, point_mode, target, r.sparsity if method != "dense" else 0.0, r.ppl,
                      ffn_bytes_read=r.ffn_bytes_read, site_sparsity=r.site_sparsity,
                      layer_sparsity=r.layer_sparsity, n_tokens=r.n_tokens, positions=positions, **protocol,
                      attention=attention if method != "dense" else None,
                      attention_sparsity=r.attention_sparsity)
        if extra_eval is not None:
            point.extra = extra_eval(model)
        point.seconds = time.time() - t0
        return point

    dense_key = Point("dense", "dense", 0.0, 0.0, 0.0, positions=positions, **protocol).key
    if dense_key not in done:
        done[dense_key] = evaluate("dense", "dense", 0.0)
        _append(results_file, done[dense_key])
        log(f"dense: ppl {done[dense_key].ppl:.3f}")
    dense_ppl = done[dense_key].ppl

    todo = {name: [s for s in sparsities
                   if Point(name, mode, s, 0.0, 0.0, positions=positions, **protocol, attention=attention).key
                   not in done]
            for name in methods if name != "dense"}
    todo = {name: targets for name, targets in todo.items() if targets}
    if "d-countdown" in todo and predictors_for is None:
        raise ValueError("d-countdown needs predictors: pass predictors_for (see countdown.train_predictors)")
    for name, s, _ in each_sparsified(model, todo, calibration_windows, mode=mode, positions=positions,
                                      predictors_for=predictors_for, attention=attention, progress=progress,
                                      **protocol):
        point = evaluate(name, mode, s)
        done[point.key] = point
        _append(results_file, point)
        log(f"{name} @ {s:.2f} ({point.protocol}): measured {point.measured:.3f}, ppl {point.ppl:.3f}")

    # points of other modes or protocols measured into the same file stay in (each row names its protocol)
    points = [p for p in done.values() if p.positions == positions and p.attention in (None, attention)]
    for p in points:
        p.delta_ppl = p.ppl - dense_ppl
    order = {m: i for i, m in enumerate(["dense", *methods])}
    return sorted(points, key=lambda p: (order.get(p.method, 99), p.mode, p.protocol, p.target))
