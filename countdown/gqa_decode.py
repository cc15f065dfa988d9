"""Decode attention for grouped-query models that reads the KV cache as it is (no ``repeat_kv`` copy).

transformers' ``sdpa`` attention (5.17) repeats every key/value head ``num_key_value_groups`` times
(``repeat_kv``) whenever it is given an attention mask, and a static-cache decode step always has
one. So every step of every layer writes a copy of the whole cache ``num_key_value_groups`` times its
size before attention reads it: on the Llama-3-8B shape with a 256-slot cache, 64 extra kernels and
0.18 ms of a 4.5 ms step (docs/BENCHMARKS.md, profile), and the copy grows with the cache length.

For one query token the copy is not needed. The query heads that share a key/value head become that
head's query *rows*: q [B, H_q, 1, D] is viewed as [B, H_kv, G, D] (query head h = kv head h // G,
row h % G, as ``repeat_kv`` pairs them), the mask [B, 1, 1, L] broadcasts over heads and rows alike,
and one attention call over the cache [B, H_kv, L, D] gives [B, H_kv, G, D] = the heads' outputs in order:
countdown's Triton kernel on CUDA (`countdown.DecodeOptions.attention_kernel`,
`countdown.kernels.decode_attention`), SDPA elsewhere.
transformers 5.25 does the same in eager mode (``pack_gqa``) but not under torch.compile, which is
where `countdown.Decoder` runs the step.

``gqa_decode_sdpa`` is registered with transformers' ``AttentionInterface`` (and the ``sdpa`` mask
with ``AttentionMaskInterface``) once per ``attention_kernel`` choice (`attention_name`); everything but a one-token step of a grouped-query
layer with a head-shared mask goes to transformers' own ``sdpa_attention_forward`` unchanged.
`decode_attention(model)` switches a model that uses ``sdpa`` to it for the duration of a block
(`countdown.Decoder` does while it generates, with ``DecodeOptions(gqa_attention=True)``, the default).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .options import ATTENTION_KERNELS

NAME = "countdown_gqa_sdpa"  # the name of the "auto" choice; "off" and "always" get a suffix (`attention_name`)


def attention_name(kernel: str = "auto") -> str:
    """The name under which `gqa_decode_sdpa` with this ``attention_kernel`` choice is registered."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention_kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    return NAME if kernel == "auto" else f"{NAME}_{kernel}"


def _packable(module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
              dropout: float, kwargs: dict) -> bool:
    """True for a one-token step of a grouped-query layer whose mask is shared by all heads."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups <= 1 or query.shape[2] != 1 or attention_mask is None or dropout:
        return False
    if kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        return False
    if kwargs.get("sinks") is not None or kwargs.get("output_attentions", False):
        return False
    if query.shape[1] != key.shape[1] * groups or attention_mask.dim() != 4:
        return False
    return attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1


def gqa_decode_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, *, attention_kernel: str = "auto",
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, H_q, T, D], key/value [B, H_kv, L, D],
    attention_mask [B, 1, T, L] (bool, or additive float) or None. Returns ([B, T, H_q, D], None).
    ``attention_kernel`` ("auto": on CUDA, "always", "off"): the packed step through countdown's
    Triton kernel where it serves the tensors, else SDPA (`countdown.DecodeOptions.attention_kernel`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _packable(module, query, key, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, _, dim = query.shape
    rows = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
    if _use_kernel(attention_kernel, rows, key, value, attention_mask):
        from .kernels import decode_attention

        out = decode_attention(rows, key, value, attention_mask, scaling)
    else:
        out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, 1, heads, value.shape[-1]), None


def _use_kernel(choice: str, rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether this packed step goes through countdown's Triton kernel (``attention_kernel`` choice)."""
    if choice not in ATTENTION_KERNELS:
        raise ValueError(f"attention_kernel must be one of {ATTENTION_KERNELS}, got {choice!r}")
    if choice == "off" or (choice == "auto" and rows.device.type != "cuda"):
        return False
    from .kernels import HAS_TRITON, decode_attention_unavailable_reason

    return HAS_TRITON and decode_attention_unavailable_reason(rows, key, value, mask) is None


def register(kernel: str = "auto") -> str:
    """Make `gqa_decode_sdpa` with this ``attention_kernel`` choice known to transformers (idempotent).
    Returns its name (`attention_name`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = attention_name(kernel)
    AttentionInterface.register(name, functools.partial(gqa_decode_sdpa, attention_kernel=kernel))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def applies(model: nn.Module) -> bool:
    """True when the model runs transformers' ``sdpa`` attention with grouped query heads."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return bool(heads and kv_heads and heads != kv_heads and hasattr(model, "set_attn_implementation"))


@contextmanager
def decode_attention(model: nn.Module, kernel: str = "auto") -> Iterator[bool]:
    """Inside the block, a model that `applies` uses `gqa_decode_sdpa` with the ``attention_kernel``
    choice ``kernel``; it gets ``sdpa`` back after. Yields whether it switched."""
    name = register(kernel)
    if not applies(model):
        yield False
        return
    model.set_attn_implementation(name)
    try:
        yield True
    finally:
        model.set_attn_implementation("sdpa")
