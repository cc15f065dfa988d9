"""RMSNorms folded into the input-sparse launch that reads their output (issue 13).

In a sparsified decode step the RMSNorm in front of q/k/v (and, for TEAL, in front of gate/up) feeds
one of our custom ops, which torch.compile cannot fuse it into. Inductor then emits each such norm as
its own single-program reduction over the hidden row: 64 launches a step on the Llama-3-8B shape, 2.6
to 10 µs each (docs/BENCHMARKS.md, profile of the TEAL step). Folding moves the norm into the
consumer: the norm module returns its input unchanged, and the consumer applies it, inside the
input-sparse kernel (``input_sparse_multi(norm=...)``) on decode tokens and by the norm's own forward
on every other path (prefill, the reference path, kernels off).

A norm is folded only where that is exact by construction: a decoder layer of a Llama-family model
(`FOLDABLE_MODEL_TYPES`) whose ``input_layernorm`` output goes to ``self_attn`` alone and whose
``post_attention_layernorm`` output goes to ``mlp`` alone, with a norm class that computes
``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)`` (`FOLDABLE_NORMS`, `reference.rms_norm`); the
input norm when the attention runs q/k/v in one launch (`countdown.fuse_qkv`, or input-sparse
projections), the FFN norm when the FFN's method can apply it (``Method.folds_input_norm``: TEAL's
gate/up launch; CATS, M-COUNTDOWN, DejaVu and CHESS, whose one fused launch holds the whole row; at 2-16
tokens these normalize before the batch kernel).

`folded_norms(model)` folds for the duration of a block (`countdown.Decoder` uses it while it
generates, so the model outside is unchanged); `fold_norms` / `unfold_norms` do it for good. The norm
keeps its parameters under their names (its class is switched, as `countdown.attention` does for
projections), so ``state_dict`` is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

FOLDABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
FOLDABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class FoldedNorm(nn.Module):
    """Mixed in before a norm's class while it is folded: forward is the identity (the consumer
    normalizes); `normalize` is the norm's own forward."""

    _fold_original: type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self._fold_original.forward(self, x)

    def kernel_norm(self) -> tuple[torch.Tensor, float]:
        """(weight [H], eps) for the kernel."""
        return self.weight, float(self.variance_epsilon)


_FOLDED_CLASSES: dict[type, type] = {}


def _folded_class(cls: type) -> type:
    if cls not in _FOLDED_CLASSES:
        _FOLDED_CLASSES[cls] = type(f"Folded{cls.__name__}", (FoldedNorm, cls), {"_fold_original": cls})
    return _FOLDED_CLASSES[cls]


def _norm_foldable(norm: nn.Module, dtype: torch.dtype) -> bool:
    weight = getattr(norm, "weight", None)
    cls = getattr(type(norm), "_fold_original", type(norm))  # a folded norm is judged by its own class
    return (cls.__name__ in FOLDABLE_NORMS and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and weight.dtype == dtype and hasattr(norm, "variance_epsilon"))


def _layers(model: nn.Module) -> list[nn.Module]:
    if getattr(getattr(model, "config", None), "model_type", None) not in FOLDABLE_MODEL_TYPES:
        return []
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return []
    wanted = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    return [layer for layer in layers if all(hasattr(layer, name) for name in wanted)
            and not hasattr(layer, "pre_feedforward_layernorm")]


def _pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(norm, consumer) pairs that can fold as the model is set up now."""
    from .attention import QKVFusedAttention
    from .ffn import SparseFFN

    pairs = []
    for layer in _layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        dtype = next(attn.parameters()).dtype
        if isinstance(attn, QKVFusedAttention) and _norm_foldable(layer.input_layernorm, dtype):
            pairs.append((layer.input_layernorm, attn))
        if (isinstance(mlp, SparseFFN) and mlp.method.folds_input_norm
                and _norm_foldable(layer.post_attention_layernorm, dtype)):
            pairs.append((layer.post_attention_layernorm, mlp))
    return pairs


def _fold(pairs: list[tuple[nn.Module, nn.Module]]) -> list[tuple[nn.Module, nn.Module]]:
    """Fold these pairs; returns those that were not folded before."""
    newly = []
    for norm, consumer in pairs:
        if not isinstance(norm, FoldedNorm):
            norm.__class__ = _folded_class(type(norm))
            newly.append((norm, consumer))
        consumer.__dict__["_input_norm"] = norm  # not a submodule: the norm stays where it is registered
    return newly


def _unfold(pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    for norm, consumer in pairs:
        consumer.__dict__.pop("_input_norm", None)
        if isinstance(norm, FoldedNorm):
            norm.__class__ = norm._fold_original


def fold_norms(model: nn.Module) -> int:
    """Fold every norm that can fold now (see the module docstring). Returns how many are folded."""
    pairs = _pairs(model)
    _fold(pairs)
    return len(pairs)


def unfold_norms(model: nn.Module) -> int:
    """Undo `fold_norms` (also for consumers the model no longer has as they were). Returns how many
    norms got their own forward back."""
    n = 0
    for module in model.modules():
        module.__dict__.pop("_input_norm", None)
        if isinstance(module, FoldedNorm):
            module.__class__ = module._fold_original
            n += 1
    return n


@contextmanager
def folded_norms(model: nn.Module) -> Iterator[int]:
    """`fold_norms` inside the block; afterwards the norms it folded are unfolded again (also when the
    block raises; norms folded before the block stay folded). Yields how many norms are folded."""
    pairs = _pairs(model)
    newly = _fold(pairs)
    try:
        yield len(pairs)
    finally:
        _unfold(newly)
