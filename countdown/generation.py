"""`generate`: ``model.generate`` for causal LMs, through the CUDA-graph loop of `countdown.decode`.

    tokens = countdown.generate(model, input_ids, attention_mask, max_new_tokens=256,
                                do_sample=True, top_p=0.9, generator=torch.Generator("cuda").manual_seed(0))

It returns what ``model.generate`` returns for the same arguments ([B, P + N] token ids, prompt
first; N is shorter than ``max_new_tokens`` when every row stopped at an end-of-sequence token):
greedy tokens are the same (tested), sampling draws from the same filtered distribution with its own
random numbers. The first call for a (batch size, cache length, `DecodeOptions`) pays for a CUDA-graph
capture (and for ``compile=True`` a ``torch.compile``); later calls reuse it. Cache lengths are rounded up to a
multiple of `BUCKET` so that prompts of similar lengths share one capture.

Why not ``model.generate`` itself: it stays correct but host-bound (25-32 tokens/s per row on the
Llama-3-8B shape on an H100, against 107 here without and 139 with ``compile=True``; see
bench/results/generate-llama-3-8b-2026-11-23.json). Its documented fast recipe,
``cache_implementation="static"`` (on CUDA it compiles the forward with ``mode="reduce-overhead"``,
i.e. cudagraph trees), fails in transformers 5.17 with "accessing tensor output of CUDAGraphs that
has been overwritten by a subsequent run". The likely cause (read from the source, not confirmed on a
GPU here): the static cache keeps its write position in tensors it mutates in place
(``cumulative_length.add_``), ``generate`` makes a fresh cache every call, and memory that cudagraph
trees hand out does not survive the next replay unless it was marked static before capture
(transformers PR #48199 fixed the same error for encoder-decoder caches that way). Even where that
path runs, each token still goes through Python logits processors, a stop check that waits for the
GPU every token, and the dynamo guards and cudagraph-tree checks of a compiled call. Here the whole step, token choice
and stop bookkeeping included, is one graph replay, and the host reads the device every 16 tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .correction import Acceptance, resolve
from .decode import Decoder, options_with
from .options import MAX_BATCH, DecodeOptions, KernelPolicy

BUCKET = 256  # cache lengths are rounded up to a multiple of this
MAX_DECODERS = 4  # per model; the least recently used one goes first (each holds a KV cache)
_ATTR = "_countdown_decoders"


class _Decoders:
    """A model's cached decoders; copies and pickles of the model start without any."""

    def __init__(self) -> None:
        self.signature: tuple = ()
        self.by_key: OrderedDict[tuple, Decoder] = OrderedDict()

    def __deepcopy__(self, memo) -> "_Decoders":
        return _Decoders()

    def __reduce__(self):
        return (_Decoders, ())


_SETTING_TYPES = (bool, int, float, str, KernelPolicy)


def _signature(model: nn.Module) -> tuple:
    """What a captured graph depends on: the module objects, their plain settings and kernel policies,
    the tensors' storage.

    `countdown.sparsify`, ``set_kernels``, ``.to()`` or loading other thresholds change it, so the
    next call captures again instead of replaying a graph of the model as it was."""
    parts = []
    for module in model.modules():
        settings = tuple((k, v) for k, v in vars(module).items() if isinstance(v, _SETTING_TYPES))
        parts.append((id(module), settings))
    tensors = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
    return tuple(parts), tensors


def _bucket(need: int, model: nn.Module) -> int:
    max_len = -(-need // BUCKET) * BUCKET
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(max_len, limit) if limit is not None and need <= limit else max_len


def decoder_for(model: nn.Module, batch_size: int, need: int, options: DecodeOptions | bool | None = None) -> Decoder:
    """The cached Decoder for ``batch_size`` rows, at least ``need`` positions and these options (made on
    first use). The key holds the options, and the model's signature its kernel policies: a changed
    choice builds a new Decoder (and graph) instead of replaying one captured under the old one.
    A bool is the ``compile=`` shortcut."""
    options = options_with(None, options) if isinstance(options, bool) else options_with(options)
    cache = model.__dict__.get(_ATTR)
    if cache is None:
        cache = _Decoders()
        object.__setattr__(model, _ATTR, cache)
    signature = _signature(model)
    if signature != cache.signature:
        cache.by_key.clear()
        cache.signature = signature
    max_len = _bucket(need, model)
    key = (batch_size, max_len, options)
    decoder = cache.by_key.get(key)
    if decoder is None:
        decoder = Decoder(model, max_len, batch_size=batch_size, options=options)
        cache.by_key[key] = decoder
        while len(cache.by_key) > MAX_DECODERS:
            cache.by_key.popitem(last=False)
    cache.by_key.move_to_end(key)
    return decoder


def clear_cache(model: nn.Module) -> None:
    """Drop the model's cached decoders (their KV caches and CUDA graphs)."""
    cache = model.__dict__.get(_ATTR)
    if cache is not None:
        cache.by_key.clear()


def _default_ids(model: nn.Module, name: str):
    config = getattr(model, "generation_config", None)
    value = getattr(config, name, None)
    return value if value is not None else getattr(model.config, name, None)


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool | None = None,
    options: DecodeOptions | None = None,
    correct_every: int | None = None,
    accept: str | Acceptance = "strict",
) -> torch.Tensor:
    """Token ids [B, P + N] like ``model.generate(input_ids, attention_mask=..., ...)``, on input_ids' device.

    ``input_ids`` [B, P] (B from 1 to 16; a [P] prompt is one row, returned as [1, P + N]) and ``attention_mask`` [B, P]
    (0 at left padding; None: no padding, not inferred from pad tokens). ``eos_token_id`` and
    ``pad_token_id`` default to the model's ``generation_config`` as in ``model.generate``
    (pass ``eos_token_id=[]`` to always generate ``max_new_tokens``); a row that produced an EOS is
    filled with the pad token (default: the first EOS id), and generation stops when every row
    has. ``do_sample``: temperature, then top_k, then top_p, as transformers' warpers; the numbers
    are drawn from ``generator`` (any device) or, if None, seeded from the global RNG.
    ``options`` (`countdown.DecodeOptions`): the decode loop's choices; ``compile=True`` is a shortcut
    for ``options=DecodeOptions(compile=True)`` (the forward through ``torch.compile`` before capture).
    ``correct_every=k`` (greedy only; `countdown.correction`): Sirius correction of a sparsified
    model: every ``k`` sparse steps one dense forward of ``k + 1`` tokens checks them and rolls back
    at the first rejected one; ``accept="strict"`` gives the dense model's greedy tokens,
    ``"relaxed"`` Sirius's likelihood rule (or an `Acceptance` with its threshold and temperature)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError("input_ids must be a torch.long tensor of token ids")
    rows = 1 if input_ids.dim() == 1 else input_ids.shape[0]
    if input_ids.dim() not in (1, 2) or not 1 <= rows <= MAX_BATCH:
        raise ValueError(f"countdown.generate serves batches of 1 to {MAX_BATCH} rows; "
                         f"input_ids has shape {tuple(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if eos_token_id is None:
        eos_token_id = _default_ids(model, "eos_token_id")
    if pad_token_id is None:
        pad_token_id = _default_ids(model, "pad_token_id")
    correction = resolve(correct_every, accept, do_sample)  # checked before a decoder is made
    spare = correction.every if correction is not None else 0  # the last check's window runs past the end
    options = options_with(options, compile)
    decoder = decoder_for(model, rows, input_ids.shape[-1] + max_new_tokens + spare, options)
    result = decoder.generate(input_ids, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample,
                              temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                              pad_token_id=pad_token_id, generator=generator, correct_every=correct_every,
                              accept=accept)
    return result.tokens.to(input_ids.device)
