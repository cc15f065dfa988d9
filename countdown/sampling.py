"""Token selection inside the decode step: greedy, or sampling with temperature, top-k and top-p.

Everything here runs on the model's device without waiting for it, so it can sit inside a captured
CUDA graph: the parameters may be 0-dim tensors (a new value needs no recapture), both filters work
on one descending sort of the scores, and a draw is the exponential race (the argmax of p / E with
E ~ Exp(1) independently per token picks token i with probability p_i), which needs only
elementwise random numbers from one generator, no ``torch.multinomial``.

The filters mean what transformers' logits warpers mean, applied in the same order: scores divided
by the temperature; then only the ``top_k`` highest kept (ties at the k-th value kept); then only the
smallest set of highest-scoring tokens whose probability reaches ``top_p`` (at least one token).
"""

from __future__ import annotations

import torch

Number = float | int | torch.Tensor


def check_sampling(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the bad argument; the values are ignored when ``do_sample`` is False."""
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {do_sample!r}")
    if not do_sample:
        return
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0 when do_sample=True, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def sorted_filtered(scores: torch.Tensor, temperature: Number, top_k: Number, top_p: Number):
    """Scores [B, V] → (filtered scores sorted descending [B, V] float32, their token ids [B, V]).

    Removed tokens score -inf. ``top_k`` >= V and ``top_p`` = 1 filter nothing."""
    scaled = scores.float() / temperature
    ranked, order = scaled.sort(dim=-1, descending=True)
    vocab = ranked.shape[-1]
    k = torch.as_tensor(top_k, device=ranked.device).clamp(1, vocab) - 1
    kth = ranked.gather(-1, k.view(1, 1).expand(ranked.shape[0], 1))
    ranked = ranked.masked_fill(ranked < kth, float("-inf"))
    probs = ranked.softmax(dim=-1)
    # a token stays while the tokens ranked above it hold less than top_p of the probability
    above = probs.cumsum(dim=-1) - probs
    # top_p = 1 keeps everything (rounding can take the cumulative sum to 1 before the last token)
    ranked = ranked.masked_fill((above >= top_p) & (torch.as_tensor(top_p) < 1), float("-inf"))
    return ranked, order


def filter_logits(scores: torch.Tensor, temperature: Number = 1.0, top_k: Number | None = None,
                  top_p: Number | None = None) -> torch.Tensor:
    """Scores [B, V] → temperature-scaled scores [B, V] float32 with the filtered-out tokens at -inf."""
    ranked, order = sorted_filtered(scores, temperature, scores.shape[-1] if top_k is None else top_k,
                                    1.0 if top_p is None else top_p)
    return torch.empty_like(ranked).scatter_(-1, order, ranked)


def race(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Index [B] drawn from softmax(scores [B, V]) with random numbers from ``generator``."""
    probs = scores.softmax(dim=-1)
    draws = torch.empty_like(probs).exponential_(generator=generator)
    # an exact zero draw would make 0/0 = nan for a removed token, and argmax prefers nan
    return (probs / draws.clamp_min_(torch.finfo(draws.dtype).tiny)).argmax(dim=-1)


def sample(scores: torch.Tensor, temperature: Number, top_k: Number | None, top_p: Number | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row [B] from logits [B, V]; filters only when ``top_k`` or ``top_p`` is given."""
    if top_k is None and top_p is None:
        return race(scores.float() / temperature, generator)
    ranked, order = sorted_filtered(scores, temperature, scores.shape[-1] if top_k is None else top_k,
                                    1.0 if top_p is None else top_p)
    return order.gather(-1, race(ranked, generator).unsqueeze(-1)).squeeze(-1)
