"""How the union of kept neurons grows with the decode batch: the rows a batched kernel must read.

In a decode batch every sequence keeps its own neurons, and a batched kernel reads each row in the
union of the batch's kept sets once. With independent masks (random weights) a neuron kept with
probability ``1 − s`` is in the union of ``B`` tokens with probability ``1 − s^B``; real activations are
correlated across sequences (some neurons fire for most tokens), so the union grows more slowly.

`union_growth` measures it on a sparsified model: it runs ``windows`` (one sequence each) through the
model with the masks recorded, then for each batch size ``B`` groups ``B`` different sequences at the
same position, as a decode batch would hold them, and reports the mean kept fraction of the union.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import ffn


class _RecordMasks(nn.Module):
    """A mask rule that applies ``rule`` and keeps the "coef" masks as bool [B, T, I] tensors."""

    def __init__(self, rule: nn.Module):
        super().__init__()
        self.rule = rule
        self.masks: list[torch.Tensor] = []

    def forward(self, site: str, score: torch.Tensor) -> torch.Tensor:
        mask = self.rule(site, score)
        if site == "coef":
            self.masks.append(mask.detach().bool().cpu())
        return mask


def union_kept(masks: torch.Tensor, batch_sizes: Sequence[int]) -> list[float]:
    """Mean kept fraction of the union over groups of ``B`` sequences at the same position.

    ``masks``: bool [n sequences, T positions, I neurons]; sequences are grouped in order, a tail of
    fewer than ``B`` is dropped."""
    kept = []
    for b in batch_sizes:
        groups = masks[: (masks.shape[0] // b) * b].reshape(-1, b, *masks.shape[1:])  # [n/b, b, T, I]
        kept.append(float(groups.any(dim=1).float().mean()))
    return kept


@torch.no_grad()
def union_growth(model: nn.Module, windows: torch.Tensor, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16)) -> dict:
    """{"batch_sizes", "kept" (mean union kept fraction per batch size, over layers and positions),
    "per_layer" [[...] per batch size], "independent" (1 − s^B at the measured per-token sparsity)}.

    ``windows``: [n, T] token ids, n >= max(batch_sizes) sequences; the model must be sparsified
    with ``positions="all"`` so every position is masked."""
    modules = ffn.sparse_modules(model)
    if not modules:
        raise ValueError("union_growth needs a sparsified model (countdown.sparsify first)")
    if modules[0].spec.positions != "all":
        raise ValueError("union_growth needs positions='all' (every position masked)")
    if windows.dim() != 2 or windows.shape[0] < max(batch_sizes):
        raise ValueError(f"need at least {max(batch_sizes)} windows of token ids, got shape {tuple(windows.shape)}")
    recorders = [_RecordMasks(m.masker) for m in modules]
    originals = [m.masker for m in modules]
    device = next(model.parameters()).device
    try:
        for m, r in zip(modules, recorders):
            m.masker = r
        for w in windows:
            model(input_ids=w.unsqueeze(0).to(device), use_cache=False)
    finally:
        for m, original in zip(modules, originals):
            m.masker = original
    per_layer = [union_kept(torch.cat([m.reshape(-1, *m.shape[-2:]) for m in r.masks]), batch_sizes)
                 for r in recorders]
    mean = [sum(layer[j] for layer in per_layer) / len(per_layer) for j in range(len(batch_sizes))]
    token_kept = mean[batch_sizes.index(1)] if 1 in batch_sizes else None
    independent = [1 - (1 - token_kept) ** b for b in batch_sizes] if token_kept is not None else []
    return {"batch_sizes": list(batch_sizes), "kept": mean, "per_layer": per_layer, "independent": independent}
