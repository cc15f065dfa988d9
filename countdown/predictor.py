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
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .models import FFNSite, ffn_sites

# The paper's rank 512 on Llama-3.1-8B (H=4096, I=14336) makes a predictor ≈5% of the FFN's weights;
# "auto" keeps that ratio on other shapes.
PAPER_PREDICTOR_FRACTION = 512 * (4096 + 14336) / (3 * 4096 * 14336)


def auto_rank(hidden: int, intermediate: int, ffn_matrices: int = 3) -> int:
    r = PAPER_PREDICTOR_FRACTION * ffn_matrices * hidden * intermediate / (hidden + intermediate)
    return max(16, int(round(r / 16)) * 16)


def apply_predictor(module, x: torch.Tensor) -> torch.Tensor:
    """Logits [..., I] of the predictor stored on a sparse FFN module (buffers ``predictor_V/U/b``)."""
    return (x.to(module.predictor_V.dtype) @ module.predictor_V) @ module.predictor_U.t() + module.predictor_b


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
    n_keep = t_abs.shape[-1] - int(round(sparsity * t_abs.shape[-1]))
    idx = t_abs.topk(n_keep, dim=-1).indices
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
        n_keep = inter - int(round(sparsity * inter))
        pred_topk = torch.zeros_like(logits).scatter_(-1, logits.topk(n_keep, dim=-1).indices, 1.0)
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
    windows: torch.Tensor,
    sparsity: float,
    rank: int | str = "auto",
    *,
    epochs: int = 15,
    lr: float = 1e-2,
    pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, torch.Tensor]], list[LayerReport]]:
    """Train one predictor per layer on ``windows`` ([n, seq_len] calibration tokens).

    ``pairs`` (from `collect_pairs`) skips the collection pass, e.g. when training for several
    target sparsities on the same text."""
    from .api import check_sparsity, is_sparsified

    check_sparsity(sparsity)
    sites = ffn_sites(model)
    if is_sparsified(model):
        raise ValueError("train_predictors needs the dense model; call countdown.unsparsify(model) first")
    if windows.dim() != 2 or windows.shape[0] < 2:
        raise ValueError("train_predictors needs at least 2 calibration windows (the last tenth is held out)")
    hidden, inter = sites[0].hidden_size, sites[0].intermediate_size
    r = auto_rank(hidden, inter, 3 if sites[0].kind == "gated" else 2) if rank == "auto" else int(rank)
    if not 1 <= r <= min(hidden, inter):
        raise ValueError(f"rank must be in [1, {min(hidden, inter)}], got {rank}")
    xs, ts = pairs if pairs is not None else collect_pairs(model, sites, windows, progress)
    device = next(model.parameters()).device
    ffn_weights = (3 if sites[0].kind == "gated" else 2) * hidden * inter
    predictors, reports = [], []
    for i in tqdm(range(len(sites)), desc="train predictors", disable=not progress, leave=False):
        t0 = time.time()
        params, metrics = train_layer(xs[i], ts[i], sparsity, r, epochs=epochs, lr=lr, device=device, seed=i)
        dtype = next(model.parameters()).dtype
        predictors.append({k: v.to(dtype) for k, v in params.items()})
        reports.append(LayerReport(i, r, predictor_fraction=r * (hidden + inter) / ffn_weights,
                                   seconds=time.time() - t0, **metrics))
    return predictors, reports


def summarise(reports: list[LayerReport]) -> dict:
    recalls = [r.recall for r in reports]
    return {
        "rank": reports[0].rank,
        "recall_mean": sum(recalls) / len(recalls),
        "recall_min": min(recalls),
        "recall_min_layer": recalls.index(min(recalls)),
        "predictor_fraction": reports[0].predictor_fraction,
        "train_seconds": sum(r.seconds for r in reports),
    }


def save_predictors(model: nn.Module, predictors: list[dict[str, torch.Tensor]], reports: list[LayerReport],
                    sparsity: float, path: str | Path) -> Path:
    """Predictors alone (before thresholds are calibrated) as a safetensors artifact."""
    import json

    from safetensors.torch import save_file

    from .api import ARTIFACT_FORMAT, ARTIFACT_VERSION
    from .models import fingerprint

    tensors = {f"layers.{i}.predictor_{k}": v.contiguous() for i, p in enumerate(predictors) for k, v in p.items()}
    meta = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "method": "d-countdown", "kind": "predictors",
            "sparsity": sparsity, "fingerprint": fingerprint(model), "reports": [asdict(r) for r in reports]}
    save_file(tensors, str(path), metadata={"countdown": json.dumps(meta)})
    return Path(path)


def load_predictors(model: nn.Module, path: str | Path) -> list[dict[str, torch.Tensor]]:
    """Predictors from an artifact (predictor-only or a full d-countdown sparsity artifact)."""
    from .api import _check_fingerprint, read_artifact
    from .models import fingerprint

    meta, tensors = read_artifact(path)
    _check_fingerprint(meta["fingerprint"], fingerprint(model), f"predictor artifact ({path})")
    n_layers = len(ffn_sites(model))
    out = []
    for i in range(n_layers):
        prefix = f"layers.{i}.predictor_"
        layer = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not layer:
            raise ValueError(f"{path}: no predictor for layer {i}")
        out.append(layer)
    return out


def random_predictors(model: nn.Module, rank: int | str = "auto", seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Untrained predictors of the trained ones' size, for speed measurements only: the kernels' time
    depends on how many neurons pass the threshold, not on which."""
    sites = ffn_sites(model)
    hidden, inter = sites[0].hidden_size, sites[0].intermediate_size
    r = auto_rank(hidden, inter, 3 if sites[0].kind == "gated" else 2) if rank == "auto" else int(rank)
    ref = next(model.parameters())
    g = torch.Generator(device=ref.device).manual_seed(seed)
    out = []
    for _ in sites:
        layer = {"V": torch.randn(hidden, r, generator=g, device=ref.device) / math.sqrt(hidden),
                 "U": torch.randn(inter, r, generator=g, device=ref.device) / math.sqrt(r),
                 "b": torch.zeros(inter, device=ref.device)}
        out.append({k: v.to(ref.dtype) for k, v in layer.items()})
    return out
