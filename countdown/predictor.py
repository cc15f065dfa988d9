"""D-COUNTDOWN's practical mode: per-layer low-rank predictors of which neurons have a large |t|.

As in the COUNTDOWN paper (and its released code): one predictor per layer and target sparsity,
``logits = (x V) Uᵀ + b`` with ``V: [H, r]``, ``U: [I, r]`` (linear, no activation; the per-neuron bias
``b: [I]`` is ours: it lets training start at the target keep rate and costs I numbers), trained with
binary cross-entropy against labels "neuron i is among the top (1 − s)·I of |t| for this token", where
``t = act(W_gate x) ⊙ (W_up x)`` is the direct coefficient of the dense model. At inference the
predictor's logits are the score: the top-k (or a calibrated threshold) of them picks the neurons, and
gate, up and down are read only for those.

Training data are (x, |t|) pairs from the calibration text (the paper uses lm-eval train splits; we
keep calibration text disjoint from evaluation text instead). The last tenth of the windows is held
out to measure recall/precision of the true top-(1 − s) set.

`train_predictors` returns a `Predictors`: the per-layer tensors, the sparsity they were trained for
(``sparsify`` refuses another target) and the per-layer reports.
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

# The paper's rank 512 on Llama-3.1-8B (H=4096, I=14336) makes a predictor ≈5% of the FFN's weights;
# "auto" keeps that ratio on other shapes.
PAPER_PREDICTOR_FRACTION = 512 * (4096 + 14336) / (3 * 4096 * 14336)


def auto_rank(hidden: int, intermediate: int, ffn_matrices: int = 3) -> int:
    r = PAPER_PREDICTOR_FRACTION * ffn_matrices * hidden * intermediate / (hidden + intermediate)
    return max(16, int(round(r / 16)) * 16)


def _rank_for(sites: list[FFNSite], rank: int | str) -> int:
    hidden, inter = sites[0].hidden_size, sites[0].intermediate_size
    return auto_rank(hidden, inter, 3 if sites[0].kind == "gated" else 2) if rank == "auto" else int(rank)


@dataclass
class LayerReport:
    layer: int
    rank: int
    recall: float  # of the true top-(1-s) neurons, fraction the predictor's top-k also keeps (held out)
    recall_at_zero: float  # same, when keeping the neurons with logit > 0 (the paper's rule)
    precision_at_zero: float
    kept_at_zero: float  # fraction of neurons with logit > 0
    loss_first: float
    loss_last: float
    predictor_fraction: float  # predictor weights / FFN weights (also the bytes ratio)
    seconds: float


@dataclass
class Predictors:
    """One low-rank predictor per layer (``layers[i]``: {"V": [H, r], "U": [I, r], "b": [I]}), the
    target sparsity they were trained for (None: untrained, for speed tests) and training reports."""

    layers: list[dict[str, torch.Tensor]]
    sparsity: float | None
    reports: list[LayerReport] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.layers[i]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.layers)

    def summary(self) -> dict:
        """Rank, held-out recall (mean, min and where), size relative to the FFN, training time."""
        reports = self.reports
        recalls = [r.recall for r in reports]
        return {
            "sparsity": self.sparsity,
            "rank": reports[0].rank,
            "recall_mean": sum(recalls) / len(recalls),
            "recall_min": min(recalls),
            "recall_min_layer": recalls.index(min(recalls)),
            "predictor_fraction": reports[0].predictor_fraction,
            "train_seconds": sum(r.seconds for r in reports),
        }
@torch.no_grad()
def collect_pairs(model: nn.Module, sites: list[FFNSite], windows: torch.Tensor, progress: bool = True):
    """Per layer, the FFN inputs X [N, H] and |t| [N, I] (float32, CPU) of the dense model."""
    xs: list[list[torch.Tensor]] = [[] for _ in sites]
    ts: list[list[torch.Tensor]] = [[] for _ in sites]

    def hook_for(i: int, site: FFNSite):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            xs[i].append(x.float().cpu())
            ts[i].append(site.coefficient(x).abs().float().cpu())

        return hook

    handles = [site.input_module.register_forward_pre_hook(hook_for(i, site)) for i, site in enumerate(sites)]
    device = next(model.parameters()).device
    try:
        for w in tqdm(windows, desc="collect (x, |t|)", disable=not progress, leave=False):
            model(input_ids=w.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in xs], [torch.cat(t) for t in ts]


def _topk_labels(t_abs: torch.Tensor, sparsity: float) -> torch.Tensor:
    idx = t_abs.topk(keep_count(t_abs.shape[-1], sparsity), dim=-1).indices
    return torch.zeros_like(t_abs).scatter_(-1, idx, 1.0)


def train_layer(
    x: torch.Tensor,
    t_abs: torch.Tensor,
    sparsity: float,
    rank: int,
    *,
    epochs: int = 15,
    lr: float = 1e-2,
    batch_size: int = 128,
    holdout: float = 0.1,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train one layer's predictor; returns ({"V": [H, r], "U": [I, r]}, held-out metrics)."""
    g = torch.Generator().manual_seed(seed)
    n, hidden = x.shape
    inter = t_abs.shape[1]
    n_test = max(1, int(n * holdout))
    x_train, x_test = x[: n - n_test].to(device), x[n - n_test :].to(device)
    y_all = _topk_labels(t_abs, sparsity)
    y_train, y_test = y_all[: n - n_test].to(device), y_all[n - n_test :].to(device)
    # x has a few huge outlier channels in most LLMs; normalising them keeps Adam stable. The scale is
    # folded into V afterwards, so inference is a plain (x V) Uᵀ.
    scale = x_train.abs().mean(0).clamp_min(1e-6)
    v = (torch.randn(hidden, rank, generator=g) / math.sqrt(hidden)).to(device).requires_grad_()
    u = (torch.randn(inter, rank, generator=g) / math.sqrt(rank)).to(device).requires_grad_()
    bias_init = math.log((1 - sparsity + 1e-6) / (sparsity + 1e-6))  # start at the right keep rate
    b = torch.full((inter,), bias_init, device=device, requires_grad=True)
    opt = torch.optim.AdamW([v, u, b], lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(x_train.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(x_train.shape[0], generator=g).to(device)
        for start in range(0, x_train.shape[0], batch_size):
            idx = perm[start : start + batch_size]
            logits = ((x_train[idx] / scale) @ v) @ u.t() + b
            loss = F.binary_cross_entropy_with_logits(logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    with torch.no_grad():
        v_out = v / scale[:, None]
        params = {"V": v_out.cpu(), "U": u.detach().cpu(), "b": b.detach().cpu()}
        logits = (x_test @ v_out) @ u.t() + b
        pred_topk = torch.zeros_like(logits).scatter_(-1, logits.topk(keep_count(inter, sparsity), dim=-1).indices, 1.0)
        true = y_test.sum().clamp_min(1)
        pred_zero = (logits > 0).float()
        metrics = {
            "recall": float((pred_topk * y_test).sum() / true),
            "recall_at_zero": float((pred_zero * y_test).sum() / true),
            "precision_at_zero": float((pred_zero * y_test).sum() / pred_zero.sum().clamp_min(1)),
            "kept_at_zero": float(pred_zero.mean()),
            "loss_first": sum(losses[:10]) / max(1, len(losses[:10])),
            "loss_last": sum(losses[-10:]) / max(1, len(losses[-10:])),
        }
    return params, metrics


def train_predictors(
    model: nn.Module,
    sparsity: float,
    calibration: Any = None,
    tokenizer: Any = None,
    *,
    rank: int | str = "auto",
    epochs: int = 15,
    lr: float = 1e-2,
    seq_len: int = 512,
    max_windows: int | None = 32,
    pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    progress: bool = True,
) -> Predictors:
    """Train one D-COUNTDOWN predictor per layer for target ``sparsity``.

    ``calibration``: texts (with ``tokenizer``) or token windows, as for `countdown.sparsify`; the last
    tenth of the windows is held out for the recall reports. ``pairs`` (from `collect_pairs`) skips the
    collection pass, e.g. when training for several targets on the same text. The result goes to
    ``sparsify(model, "d-countdown", sparsity, predictors=...)`` as is."""
    check_sparsity(sparsity)
    sites = ffn_sites(model)
    parallel.refuse_sharded(sites, "predictor training")
    if is_sparsified(model):
        raise ValueError("train_predictors needs the dense model; call countdown.unsparsify(model) first")
    if calibration is None and pairs is None:
        raise ValueError("train_predictors needs calibration=... (texts with tokenizer=..., or token windows)")
    r = _rank_for(sites, rank)
    hidden, inter = sites[0].hidden_size, sites[0].intermediate_size
    if not 1 <= r <= min(hidden, inter):
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
    layers, reports = [], []
    for i in tqdm(range(len(sites)), desc="train predictors", disable=not progress, leave=False):
        t0 = time.time()
        params, metrics = train_layer(xs[i], ts[i], sparsity, r, epochs=epochs, lr=lr, device=device, seed=i)
        layers.append({k: v.to(dtype) for k, v in params.items()})
        reports.append(LayerReport(i, r, predictor_fraction=r * (hidden + inter) / ffn_weights,
                                   seconds=time.time() - t0, **metrics))
    return Predictors(layers, float(sparsity), reports)


class PredictorCache:
    """``cache(s)``: predictors for target ``s`` trained once on ``windows`` (one collection of
    (x, |t|) pairs for every target), with each summary logged and, given ``out``, written to
    ``out/predictors_<s%>.json``."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, out: Path | None = None,
                 log: Callable[[str], None] = print, progress: bool = True):
        self.model, self.windows, self.out, self.log, self.progress = model, windows, out, log, progress
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._trained: dict[float, Predictors] = {}

    def __call__(self, sparsity: float) -> Predictors:
        if sparsity not in self._trained:
            if self._pairs is None:
                self._pairs = collect_pairs(self.model, ffn_sites(self.model), self.windows, self.progress)
            preds = train_predictors(self.model, sparsity, pairs=self._pairs, progress=self.progress)
            s = preds.summary()
            self.log(f"predictors for {sparsity:.0%}: rank {s['rank']}, recall mean {s['recall_mean']:.3f} "
                     f"min {s['recall_min']:.3f} (layer {s['recall_min_layer']}), "
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
            "predictor_sparsity": predictors.sparsity, "fingerprint": fingerprint(model),
            "reports": [asdict(r) for r in predictors.reports]}
    return artifact.write(path, artifact.predictor_tensors(predictors.layers), meta)


def load_predictors(model: nn.Module, path: str | Path) -> Predictors:
    """Predictors from an artifact (predictor-only or a full d-countdown sparsity artifact)."""
    meta, tensors = artifact.read(path)
    artifact.check_fingerprint(meta["fingerprint"], fingerprint(model), f"predictor artifact ({path})")
    layers = artifact.predictor_layers(tensors, len(ffn_sites(model)), path)
    reports = [LayerReport(**r) for r in meta.get("reports", [])]
    return Predictors(layers, meta.get("predictor_sparsity", meta.get("sparsity")), reports)


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
